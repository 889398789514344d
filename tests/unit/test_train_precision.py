"""The precision policy (docs/training.md), checked in a real DeepSpeed engine and in the plain model.

Trainable parameters stay float32 (the master weights) after deepspeed.initialize, ZeRO-2 and ZeRO-3; the
frozen ViT and LLM stay in their configured dtype; the forward runs under autocast, yet ln_vision, the
ITC similarities (divided by temp), the ITM/ITG logits and the losses are float32. The engines are built
in this process (DS_ACCELERATOR=cpu, gloo, world size 1, no Ray): a few seconds each.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections import Counter

import pytest
import torch

from blip2_ray.config import load_config
from blip2_ray.train.config import PretrainConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny(stage: int, zero: int, **sets) -> PretrainConfig:
    base = {"stage": stage, "data.image_size": 32, "train.global_batch_size": 4, "train.micro_batch_size": 4,
            "scaling.num_workers": 1, "train.precision": "bf16", "deepspeed.zero_stage": zero,
            "deepspeed.stage3_param_persistence_threshold": 0, "model.vision.dtype": "float16",
            "model.llm.dtype": "bfloat16", **sets}
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # what a launcher (Ray Train, torchrun) sets; DeepSpeed checks LOCAL_RANK
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class OutputDtypes:
    """Forward hooks recording the dtype of named modules' outputs."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.seen: dict[str, set] = {n: set() for n in names}
        for n in names:
            model.get_submodule(n).register_forward_hook(
                lambda m, i, out, n=n: self.seen[n].add(out.dtype))


def held_dtype(p: torch.nn.Parameter) -> torch.dtype:
    """The dtype a parameter is stored in (ZeRO-3: its partition)."""
    return p.ds_tensor.dtype if hasattr(p, "ds_tensor") else p.dtype


def frozen_dtypes(module: torch.nn.Module) -> Counter:
    return Counter(held_dtype(p) for p in module.parameters() if not p.requires_grad)


def trainable_dtypes(module: torch.nn.Module) -> Counter:
    return Counter(held_dtype(p) for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("stage, zero", [(1, 2), (1, 3), (2, 3)])
def test_policy_holds_in_a_deepspeed_engine(process_group, monkeypatch, stage, zero):
    from blip2_ray.model import losses
    from blip2_ray.train.loop import build_engine
    from blip2_ray.train.optim import deepspeed_config

    cfg = tiny(stage, zero)
    assert deepspeed_config(cfg)["torch_autocast"]["dtype"] == "bfloat16"
    engine = build_engine(cfg)
    # DeepSpeed's CPU shared-memory inference kernel was not JIT-built (train/distributed.py): gloo reduces
    assert importlib.import_module("deepspeed.comm.comm").cdb.shm_comm_op is None
    m = engine.module
    # stored dtypes after deepspeed.initialize: nothing was cast
    assert trainable_dtypes(m) == Counter({torch.float32: sum(1 for p in m.parameters() if p.requires_grad)})
    assert set(frozen_dtypes(m.vision_model)) == {torch.float16}
    ln_vision = m.vision_model.post_layernorm.weight
    assert ln_vision.requires_grad and held_dtype(ln_vision) == torch.float32
    assert held_dtype(m.query_tokens) == torch.float32
    if stage == 2:
        assert set(frozen_dtypes(m.language_model)) == {torch.bfloat16}

    names = ["vision_model.post_layernorm"]
    names += ["itm_head", "lm_head", "vision_projection", "text_projection",
              "qformer.encoder.layer.0.attention.attention.query"] if stage == 1 else \
             ["language_projection", "qformer.encoder.layer.0.attention.attention.query", "language_model.lm_head"]
    seen = OutputDtypes(m, names)
    sims = []
    real_itc = losses.itc_objective
    monkeypatch.setattr(losses.Objectives, "itc",
                        staticmethod(lambda *a: sims.append(real_itc(*a)[:2]) or real_itc(*a)))

    engine.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad and p.numel() > 0}
    ids = torch.randint(5, 30, (4, 8))
    out = engine(torch.randn(4, 3, 32, 32), ids, torch.ones_like(ids))
    assert all(v.dtype == torch.float32 for k, v in out.items() if k.startswith("loss"))
    assert seen.seen.pop("qformer.encoder.layer.0.attention.attention.query") == {torch.bfloat16}  # autocast is on
    if stage == 2:
        assert seen.seen.pop("language_projection") == {torch.bfloat16}
        assert seen.seen.pop("language_model.lm_head") == {torch.bfloat16}  # the LLM as stored, autocast off
    assert all(d == {torch.float32} for d in seen.seen.values()), seen.seen  # the float32 islands
    if stage == 1:
        assert sims and all(s.dtype == torch.float32 for pair in sims for s in pair)
    engine.backward(out["loss"])
    engine.step()
    assert trainable_dtypes(m) == Counter({torch.float32: sum(1 for p in m.parameters() if p.requires_grad)})
    assert set(frozen_dtypes(m.vision_model)) == {torch.float16}
    if zero == 2:  # ZeRO-3 holds partitions between steps; its values are checked by the integration test
        assert any(not torch.equal(before[n], p.detach()) for n, p in m.named_parameters() if n in before)


def proxy_batch():
    ids = torch.randint(5, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    return {"pixel_values": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(1)),
            "qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)}


def test_the_worker_micro_step_reads_nothing_on_the_host(process_group, host_reads):
    """The worker's micro step (train/loop.micro_step: forward, engine.backward, engine.step; ZeRO-2 without
    clipping computes no gradient norm) reads no tensor value on the host, except torch AdamW's step counters
    (CPU tensors on a GPU machine too: no device sync)."""
    from blip2_ray.train.loop import build_engine, micro_step

    cfg = tiny(1, 2)
    engine = build_engine(cfg)
    engine.train()
    micro_step(engine, cfg, proxy_batch(), 0, 1)  # the optimizer's state exists after its first step
    counters = [s["step"] for s in engine.optimizer.optimizer.state.values() if torch.is_tensor(s.get("step"))]
    assert counters and all(c.device.type == "cpu" for c in counters)
    with host_reads(allowed=counters) as reads:
        micro_step(engine, cfg, proxy_batch(), 0, 2)
    assert reads.seen == []


@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_engine_trains_as_the_eager_one(process_group, zero):
    """train.compile in a real engine (ZeRO-3: the compiled blocks are ZeRO-3 leaves): the worker's micro step
    (train/loop.micro_step, which compiles at its first call) gives the eager engine's losses over two steps, the
    second after the first update. aot_eager: see tests/unit/test_model_compile.py; no dropout, same negatives."""
    from blip2_ray.train.loop import build_engine, micro_step

    batch = proxy_batch()
    runs = {}
    for compiled in (False, True):
        cfg = tiny(1, zero, **{"model.qformer.dropout": 0.0, "train.compile": compiled,
                               "train.compile_backend": "aot_eager"})
        engine = build_engine(cfg)
        engine.train()
        steps = []
        for step in (1, 2):
            torch.manual_seed(step)
            steps.append(micro_step(engine, cfg, dict(batch), 0, step)["loss"].detach())
        runs[compiled] = torch.stack(steps)
        regions = getattr(engine.module, "compiled_regions", None)
        assert (regions is not None and regions.mode == "run" and regions.fallback_reason is None) == compiled
    torch.testing.assert_close(runs[True], runs[False], rtol=2e-2, atol=0)
    assert not torch.equal(runs[False][0], runs[False][1])  # the step changed the model


def test_itc_similarities_are_float32_under_autocast_and_match_the_float32_reference():
    from blip2_ray.model.losses import itc_similarities

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    temp = torch.tensor([0.07])
    ref_i2t = torch.einsum("bqe,ne->bnq", img, txt).amax(-1) / temp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        i2t, t2i = itc_similarities(img, txt, temp)
    assert i2t.dtype == t2i.dtype == torch.float32
    torch.testing.assert_close(i2t, ref_i2t)


def test_frozen_parts_compute_in_their_storage_dtype_under_autocast():
    """An fp16 ViT under bf16 autocast computes in fp16 (its weights as stored); ln_vision returns float32."""
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage1

    torch.manual_seed(0)
    model = build_stage1(model_config("tiny", vision={"dtype": "float16"})).eval()
    seen = OutputDtypes(model, ["vision_model.encoder.layers.0.mlp.fc1", "vision_model.post_layernorm"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.encode_image(torch.randn(2, 3, 32, 32))
    assert seen.seen == {"vision_model.encoder.layers.0.mlp.fc1": {torch.float16},
                         "vision_model.post_layernorm": {torch.float32}}
    assert tokens.dtype == torch.float32


def test_fp16_with_flant5_is_a_config_error():
    from blip2_ray.config import ConfigError

    with pytest.raises(ConfigError, match="FlanT5 overflows in float16"):
        tiny(2, 2, **{"model.preset": "tiny_t5", "model.llm.dtype": "float16"})
    with pytest.raises(ConfigError, match="FlanT5 overflows in float16"):
        tiny(2, 2, **{"model.preset": "tiny_t5", "scaling.use_gpu": True, "train.precision": "fp16"})
    assert tiny(2, 2, **{"model.preset": "tiny_t5"}).model.llm.kind == "t5"  # bf16 + bfloat16 LLM is fine
