"""ZeRO-3 builds the frozen ViT / LLM partitioned (train/zero3.py): two gloo processes, no Ray.

Each rank builds the stage-2 model as the Train worker does (`train.loop.build_model`), then, before any
DeepSpeed engine exists: it holds about half of every frozen parameter, and the values that arrive (gathered
back parameter by parameter) are the written files' (a Blip2VisionModel directory and an OPT directory, as
transformers' save_pretrained writes them) or, with random frozen parts, a plain build's (the ViT exactly,
the OPT in distribution).
Then the engine trains a step and the export gathers everything into a directory HF loads with the same values.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_cfg(out_dir: str, **sets):
    from blip2_ray.config import load_config
    from blip2_ray.train.config import PretrainConfig

    base = {"stage": 2, "data.image_size": 32, "train.global_batch_size": 2 * WORLD, "train.micro_batch_size": 2,
            "scaling.num_workers": WORLD, "train.precision": "bf16", "deepspeed.zero_stage": 3,
            "deepspeed.stage3_param_persistence_threshold": 0, "model.vision.dtype": "float16",
            "model.llm.dtype": "bfloat16", "output_dir": out_dir, **sets}
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def _rank_main(rank: int, port: int, sets: dict, out_dir: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch.distributed as dist

    from blip2_ray.model.partitioned import held_numel
    from blip2_ray.train.loop import build_engine, build_model, export_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    cfg = zero3_cfg(out_dir, **sets)
    model = build_model(cfg)
    held, total = held_numel(model)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    values = {}
    for n, p in frozen.items():  # gathered one at a time, as a check only
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            values[n] = p.detach().clone()
    result = {"held": held, "total": total, "partitioned": all(hasattr(p, "ds_tensor") for p in frozen.values()),
              "dtypes": sorted({str(p.ds_tensor.dtype) for p in frozen.values()})}
    if rank == 0:
        torch.save(values, os.path.join(result_dir, "frozen.pt"))
    del model, values
    engine = build_engine(cfg)
    engine.train()
    opt = engine.optimizer
    # the float32 master partitions are the parameter partitions themselves (zero3.share_fp32_partitions)
    result["master_is_partition"] = all(m is p for m, p in zip(opt.fp32_partitioned_groups_flat,
                                                               opt.fp16_partitioned_groups_flat))
    before = [p.clone() for p in opt.fp16_partitioned_groups_flat]
    ids = torch.randint(5, 30, (2, 6))
    out = engine(torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids))
    engine.backward(out["loss"])
    engine.step()
    result["loss"] = float(out["loss"].detach())
    after = opt.fp16_partitioned_groups_flat
    result["step_updated_partitions"] = all(not torch.equal(b, p) for b, p in zip(before, after))
    export_model(engine, cfg, rank)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run_world(tmp_path, sets: dict) -> tuple[list[dict], dict]:
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_rank_main, args=(free_port(), sets, str(tmp_path / "export"), str(results)),
                       nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, torch.load(results / "frozen.pt", weights_only=True)


@pytest.fixture(scope="module")
def written_sources(tmp_path_factory):
    """A tiny Blip2VisionModel directory and an OPT directory, written by transformers, values seeded."""
    from blip2_ray.model.config import model_config
    from blip2_ray.model.language_model import padded_vocab
    from blip2_ray.model.vision import vision_module
    from blip2_ray.weights.language_model import build_language_model
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    d = tmp_path_factory.mktemp("sources")
    cfg = model_config("tiny")
    torch.manual_seed(123)
    vit = vision_module(cfg.vision)
    vit.save_pretrained(d / "vit")
    llm = build_language_model(cfg, padded_vocab(len(llm_tokenizer(cfg))))
    llm.save_pretrained(d / "opt")
    return str(d / "vit"), str(d / "opt")


def _check_partitioned(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["partitioned"] and r["dtypes"] == ["torch.bfloat16", "torch.float16"]
        # each rank holds its slice (at most one element of padding per parameter beyond half)
        assert 0.5 <= r["held"] / r["total"] <= 0.52, r
    assert sum(r["held"] for r in ranks) >= ranks[0]["total"]
    assert all(r["master_is_partition"] and r["step_updated_partitions"] for r in ranks), ranks


def test_zero3_reads_each_rank_slice_of_the_written_files(tmp_path, written_sources):
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    vit_dir, opt_dir = written_sources
    ranks, frozen = run_world(tmp_path, {"model.vision.path": vit_dir, "model.llm.path": opt_dir})
    _check_partitioned(ranks)
    vit_file, opt_file = load_file(f"{vit_dir}/model.safetensors"), load_file(f"{opt_dir}/model.safetensors")
    n_vit = n_llm = 0
    for name, value in frozen.items():
        if name.startswith("vision_model."):
            expected, n_vit = vit_file[name.removeprefix("vision_model.")].to(torch.float16), n_vit + 1
        else:
            key = name.removeprefix("language_model.")
            expected, n_llm = opt_file[key].to(torch.bfloat16), n_llm + 1
        assert torch.equal(value, expected), name
    assert n_vit == len(vit_file) - 2 and n_llm >= len(opt_file) - 1  # ln_vision trains; the LM head is tied
    assert all(r["loss"] == r["loss"] for r in ranks)  # a finite step on the partitioned model
    # the export (gathered parameter by parameter) holds the files' frozen values and loads in HF
    from blip2_ray.weights.checkpoint_files import TensorFiles

    exported = TensorFiles(str(tmp_path / "export"))
    assert torch.equal(exported.get("vision_model.encoder.layers.0.mlp.fc1.weight"),
                       vit_file["encoder.layers.0.mlp.fc1.weight"].to(torch.float16))
    assert torch.equal(exported.get("language_model.model.decoder.layers.1.fc2.weight"),
                       opt_file["model.decoder.layers.1.fc2.weight"].to(torch.bfloat16))
    assert exported.get("query_tokens").dtype == torch.float32  # the trained float32 masters
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=torch.float32)
    assert hf.config.num_query_tokens == 8


def test_zero3_random_frozen_parts_follow_the_plain_build(tmp_path):
    """The ViT's random init is the plain build's exactly; the OPT's is HF's own init (same std per tensor)
    drawn in another order (HF initialises OPTModel before its LM head exists)."""
    from blip2_ray.weights.builders import build_stage2

    ranks, frozen = run_world(tmp_path, {})
    _check_partitioned(ranks)
    cfg = zero3_cfg(str(tmp_path / "unused"))
    torch.manual_seed(cfg.train.seed)
    plain = dict(build_stage2(cfg.model).named_parameters())
    assert set(frozen) == {n for n, p in plain.items() if not p.requires_grad}
    for name, value in frozen.items():
        expected = plain[name].detach()
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        if name.startswith("vision_model."):
            assert torch.equal(value, expected), name
        elif value.dim() == 2:
            assert abs(value.float().std() / expected.float().std() - 1) < 0.2, name
        else:  # LayerNorm weights / biases: ones and zeros
            assert torch.equal(value, expected), name
