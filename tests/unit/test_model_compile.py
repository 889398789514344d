"""The step without host reads, and its regional compilation (model/compile.py), at tiny size on CPU.

- No host-device synchronisation: the stage-1 and stage-2 steps (forward and backward) read no tensor value on
  the host (a dispatch mode sees every `.item()`, `nonzero`, `multinomial`...), and the objectives and both
  stages' whole forwards trace into one graph with torch.compile(fullgraph=True).
- The compiled regions give the eager losses and gradients: float32 to 1e-5, bf16 autocast within bf16's
  precision; with a trained ViT under gradient checkpointing too. Compiled with `aot_eager` (traced and
  differentiated ahead of time: the part that can change a model's arithmetic; inductor's code generation takes
  minutes on 2 cores and is compared with eager by `bench/gpu_train.py`, `same_losses`).
- Bad input: a backend that fails makes the step eager with one CompileWarning; a compile past its time limit
  says so, and the step still trains.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

from blip2_ray.model import losses
from blip2_ray.model.compile import CompileWarning, compile_model
from blip2_ray.model.config import model_config
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer


def batch(b=4, t=12, size=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (b, t), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1:, 9:] = 0
    return torch.randn(b, 3, size, size, generator=g), ids, mask


def stage1(**qformer):
    torch.manual_seed(0)
    return build_stage1(model_config("tiny", qformer={"dropout": 0.0, **qformer})).train()


def stage2(preset="tiny"):
    torch.manual_seed(0)
    cfg = model_config(preset, qformer={"dropout": 0.0})
    return build_stage2(cfg, llm_tokenizer(cfg)).train()


@pytest.mark.parametrize("which", ["stage1", "stage2"])
def test_a_step_reads_nothing_on_the_host(tiny_tokenizers, host_reads, which):
    model = stage1() if which == "stage1" else stage2()
    x, ids, mask = batch()
    with host_reads() as reads, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, ids, mask).loss.backward()
    assert reads.seen == []


def test_objectives_and_whole_forwards_trace_into_one_graph(tiny_tokenizers):
    """fullgraph=True fails on any graph break: a host read, a data-dependent shape, a branch on a value."""
    torch.manual_seed(0)
    b, n, q, e, v = 4, 4, 8, 16, 40
    feats = torch.nn.functional.normalize(torch.randn(b, q, e), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(b, e), dim=-1)
    temp = torch.tensor([0.07])
    labels = torch.randint(0, v, (b, 6)).masked_fill(torch.rand(b, 6) < 0.3, -100)

    def objectives(feats, text, temp, labels, itm_logits, lm_logits):
        sim_i2t, sim_t2i, itc = losses.itc_objective(feats, text, feats, text, temp, 0, 0.1)
        neg_img, neg_txt = losses.sample_hard_negatives(sim_i2t, sim_t2i)
        itg = losses.itg_loss(lm_logits, losses.itg_targets(labels), 0.1)
        return itc, losses.itm_loss(itm_logits, b), itg, neg_img, neg_txt

    args = (feats, text, temp, labels, torch.randn(3 * b, 2), torch.randn(b * 6, v))
    eager = objectives(*args)
    traced = torch.compile(objectives, backend="eager", fullgraph=True)(*args)
    for a, c in zip(eager[:3], traced[:3]):
        torch.testing.assert_close(a, c)
    assert all(((i >= 0) & (i < n)).all() for i in traced[3:])

    x, ids, mask = batch()
    for model in (stage1(), stage2(), stage2("tiny_t5")):
        out = torch.compile(model.forward, backend="eager", fullgraph=True)(x, ids, mask)
        assert torch.isfinite(out.loss)


def losses_and_grads(model, x, ids, mask, autocast: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same hard negatives on both paths (drawn eagerly)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, ids, mask)
    out.loss.backward()
    values = torch.stack([v.detach() for k, v in vars(out).items() if k.startswith("loss")])
    return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


def assert_same_step(eager_model, compiled_model, autocast: bool, x, ids, mask):
    ref_losses, ref_grads = losses_and_grads(eager_model, x, ids, mask, autocast)
    new_losses, new_grads = losses_and_grads(compiled_model, x, ids, mask, autocast)
    assert new_grads.keys() == ref_grads.keys()
    # float32: the same operations (1e-5); bf16 autocast: the traced graph rounds differently, within bf16's
    # precision (eps 2^-8 = 0.004), the gradient as a whole (single tiny entries, e.g. key biases whose exact
    # gradient is 0, are rounding noise)
    rtol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(new_losses, ref_losses, rtol=rtol, atol=0)
    err = (flat(new_grads) - flat(ref_grads)).norm() / flat(ref_grads).norm()
    assert err < rtol, float(err)


@pytest.mark.parametrize("which", ["stage1", "stage2_trained_vit_checkpointed"])
def test_compiled_regions_give_the_eager_losses_and_gradients(tiny_tokenizers, which):
    from torch._dynamo.utils import counters

    from blip2_ray.model.vision import unfreeze_vision

    if which == "stage1":
        eager = stage1()
    else:
        eager = stage2()
        unfreeze_vision(eager.vision_model, grad_checkpointing=True)
        eager.train()
    compiled_model = copy.deepcopy(eager)
    counters.clear()
    compiled = compile_model(compiled_model, backend="aot_eager")
    x, ids, mask = batch()
    for autocast in (False, True) if which == "stage1" else (True,):
        assert_same_step(eager, compiled_model, autocast, x, ids, mask)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    # every ViT block and Q-Former layer runs compiled; one graph serves all blocks of a kind
    blocks = len(eager.vision_model.encoder.layers) + len(eager.qformer.encoder.layer)
    assert len([m for m in compiled.modules if "Layer" in type(m).__name__]) >= blocks


def test_warm_up_compiles_then_runs_without_compiling(tiny_tokenizers):
    model = stage1()
    compiled = compile_model(model, backend="aot_eager")
    x, ids, mask = batch()
    seconds = compiled.warm_up(lambda: model(x, ids, mask).loss, list(model.parameters()))
    assert seconds > 0 and compiled.mode == "run" and compiled.fallback_reason is None
    assert all(p.grad is None for p in model.parameters())  # the warm-up accumulates no gradient
    model(x, ids, mask).loss.backward()
    assert model.query_tokens.grad is not None


def failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here")


def slow_backend(gm, example_inputs):
    time.sleep(0.3)
    return gm.forward


def test_a_platform_that_cannot_compile_trains_eagerly_after_one_warning(tiny_tokenizers):
    eager, model = stage1(), stage1()
    compiled = compile_model(model, backend=failing_backend)
    x, ids, mask = batch()
    with pytest.warns(CompileWarning, match="compiling failed .*no C\\+\\+ compiler here.*runs eagerly") as w:
        compiled.warm_up(lambda: model(x, ids, mask).loss, list(model.parameters()))
    assert len(w) == 1 and compiled.mode == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert_same_step(eager, model, False, x, ids, mask)


def test_a_compile_past_its_time_limit_says_so_and_the_step_still_trains(tiny_tokenizers):
    model = stage1()
    compiled = compile_model(model, backend=slow_backend)
    x, ids, mask = batch()
    with pytest.warns(CompileWarning, match="longer than train.compile_time_limit_s=0.5 s"):
        compiled.warm_up(lambda: model(x, ids, mask).loss, list(model.parameters()), time_limit_s=0.5)
    assert compiled.mode == "run" and "0.5 s" in compiled.fallback_reason
    loss = model(x, ids, mask).loss
    loss.backward()
    assert torch.isfinite(loss) and model.query_tokens.grad is not None
