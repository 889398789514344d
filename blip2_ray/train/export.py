"""The end of a training run: the trained model exported in its task's HF layout (train/tasks), LoRA adapters of
the LLM merged into it (and saved alone too, with llm_lora.save_adapter)."""

from __future__ import annotations

import os

from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.tasks import task_of


def export_model(engine, cfg: PretrainConfig, rank: int) -> str | None:
    """World-size-free HF export of the trained weights to cfg.output_dir (rank 0 writes; all ranks call).

    No rank builds another model: every tensor of the engine's module (ZeRO-3: each parameter gathered
    alone, the frozen ViT / LLM too) is streamed into safetensors shards by rank 0
    (weights/hf_export_stream.py), so the export adds at most one shard to a worker's memory.
    """
    import torch.distributed as dist

    from blip2_ray.model.llm_lora import merged_lora_state
    from blip2_ray.train.zero3 import gathered_state
    from blip2_ray.weights.hf_export_stream import export_streamed

    task = task_of(cfg)
    tokenizer = question_tokenizer = None
    if rank == 0:
        tokenizer, question_tokenizer = task.export_tokenizers(cfg, engine.module)
    adapters: dict = {}  # LoRA on the LLM: merged into the export, and kept alone for save_lora_adapter
    tensors = merged_lora_state(engine.module, gathered_state(engine.module, rank), adapters)
    out = export_streamed(engine.module, task.stage, tensors, cfg.output_dir if rank == 0 else None, tokenizer,
                          cfg.model, qformer_tokenizer=question_tokenizer)
    if out is not None:
        print(f"[stage{cfg.stage}] exported to {out}", flush=True)
        lora = getattr(engine.module, "llm_lora", None)
        if adapters and lora and getattr(cfg, "llm_lora", None) is not None and cfg.llm_lora.save_adapter:
            from blip2_ray.model.llm_lora import ADAPTER_DIR, save_lora_adapter

            where = save_lora_adapter(os.path.join(out, ADAPTER_DIR), adapters, lora,
                                      engine.module.language_model.config)
            print(f"[stage{cfg.stage}] LoRA adapters of the LLM (merged into the export) also saved alone to "
                  f"{where}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return out
