"""Tiny frozen backbones that know something, for the CPU demo and the "it learns" checks.

BLIP-2 bridges a *pre-trained* image encoder and a *pre-trained* LLM. With no weights to download,
the demo first pre-trains a tiny ViT (to tell colours and shapes apart) and a tiny OPT (to write
captions) on the generated data, saves them in HF format, and BLIP-2 then uses them frozen through
`model.vision.path` / `model.llm.path`, exactly like real checkpoints. Plain PyTorch, a few seconds each.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ray.model.config import ModelConfig
from blip2_ray.model.hf_io import build_language_model, padded_vocab
from blip2_ray.model.vision import build_vision_model


def pretrain_tiny_vision(
    cfg: ModelConfig, pixels: torch.Tensor, labels: list[torch.Tensor], out_dir: str,
    steps: int = 300, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
) -> str:
    """Train the ViT of `cfg.vision` (EVA layout) as a classifier of each label set; save HF format.

    pixels (N, 3, S, S) normalised; labels: one (N,) class-id tensor per attribute (e.g. colour, shape).
    """
    torch.manual_seed(seed)
    vision = build_vision_model(cfg.vision)
    heads = nn.ModuleList(nn.Linear(cfg.vision.hidden_size, int(y.max()) + 1) for y in labels)
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    vision.train()
    for _ in range(steps):
        idx = torch.randint(0, pixels.shape[0], (batch_size,), generator=g)
        h = vision(pixel_values=pixels[idx]).last_hidden_state.mean(1)  # (B, D)
        loss = sum(F.cross_entropy(head(h), y[idx]) for head, y in zip(heads, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vision.eval()
    vision.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def pretrain_tiny_llm(
    cfg: ModelConfig, tokenizer, captions: list[str], out_dir: str,
    steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
) -> str:
    """Train the OPT of `cfg.llm` as a language model of `captions` (each ending in "\\n"); save HF format."""
    if cfg.llm.kind != "opt":
        raise ValueError("the tiny LLM pre-training covers OPT (the demo's LLM)")
    torch.manual_seed(seed)
    llm = build_language_model(cfg, cfg.llm.vocab_size or padded_vocab(len(tokenizer)))
    texts = [c + "\n" for c in captions]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    llm.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch_size,), generator=g)
        ids, mask = enc.input_ids[idx], enc.attention_mask[idx]
        loss = llm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    llm.eval()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
