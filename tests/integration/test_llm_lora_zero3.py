"""LoRA on the LLM under ZeRO-3 (two gloo processes, no Ray): the frozen OPT is built partitioned, the adapters
are partitioned by DeepSpeed with the Q-Former and trained by a step, the base weights stay as written, and the
export gathers everything into a plain directory whose LLM weights are the written ones plus B A alpha / r (the
adapters saved alone beside it)."""

from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp

from blip2_ray.runtime.cluster import free_port

WORLD = 2


def _rank_main(rank: int, port: int, opt_dir: str, out_dir: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from blip2_ray.config import load_config
    from blip2_ray.train.export import export_model
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.loop import build_engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    sets = {"task": "caption", "annotations.train": "unused.json", "vision_training.freeze_vit": True,
            "llm_lora.r": 4, "llm_lora.alpha": 8, "llm_lora.dropout": 0.0, "model.llm.path": opt_dir,
            "data.image_size": 32, "train.global_batch_size": 2 * WORLD, "train.micro_batch_size": 2,
            "train.lr": 1e-2, "train.warmup_steps": 0, "scaling.num_workers": WORLD, "deepspeed.zero_stage": 3,
            "deepspeed.stage3_param_persistence_threshold": 0, "model.llm.dtype": "float32",
            "train.precision": "fp32", "output_dir": out_dir}
    cfg = load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in sets.items()])
    engine = build_engine(cfg)
    engine.train()
    lora = {n: p for n, p in engine.module.named_parameters() if ".lora_" in n}
    base = [p for n, p in engine.module.language_model.named_parameters() if ".lora_" not in n]
    result = {"lora_partitioned": bool(lora) and all(hasattr(p, "ds_tensor") for p in lora.values()),
              "lora_trainable": all(p.requires_grad for p in lora.values()),
              "base_frozen": not any(p.requires_grad for p in base)}
    ids = torch.randint(5, 30, (2, 6))
    for _ in range(2):  # B starts at zero: the second step moves A too
        out = engine(torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids))
        engine.backward(out["loss"])
        engine.step()
    export_model(engine, cfg, rank)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_lora_trains_partitioned_under_zero3_and_the_export_merges_it(tmp_path):
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    from blip2_ray.model.config import model_config
    from blip2_ray.model.language_model import padded_vocab
    from blip2_ray.weights.language_model import build_language_model
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_config("tiny")
    torch.manual_seed(7)
    build_language_model(cfg, padded_vocab(len(llm_tokenizer(cfg)))).save_pretrained(tmp_path / "opt")
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path / "opt"), str(tmp_path / "export"), str(results)),
                       nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["lora_partitioned"] and r["lora_trainable"] and r["base_frozen"] for r in ranks), ranks

    written = load_file(str(tmp_path / "opt" / "model.safetensors"))
    adapter = load_file(str(tmp_path / "export" / "llm_lora_adapter" / "adapter_model.safetensors"))
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=torch.float32).state_dict()
    assert not any("lora" in k for k in hf)
    for layer in range(cfg.llm.num_layers):
        for name in ("q_proj", "v_proj"):
            path = f"model.decoder.layers.{layer}.self_attn.{name}"
            a, b = adapter[f"base_model.model.{path}.lora_A.weight"], adapter[f"base_model.model.{path}.lora_B.weight"]
            assert b.abs().max() > 0  # trained
            expected = written[f"{path}.weight"] + b @ a * 2.0
            assert torch.allclose(hf[f"language_model.{path}.weight"], expected, atol=1e-6), path
        fc1 = f"model.decoder.layers.{layer}.fc1.weight"
        assert torch.equal(hf[f"language_model.{fc1}"], written[fc1])
