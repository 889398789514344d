"""Tiny frozen backbones that know something, for the CPU demo and the "it learns" checks.

BLIP-2 bridges a *pre-trained* image encoder and a *pre-trained* LLM. With no weights to download,
the demo first pre-trains a tiny ViT (to tell colours and shapes apart) and a tiny OPT (to write
captions) on the generated data, saves them in HF format, and BLIP-2 then uses them frozen through
`model.vision.path` / `model.llm.path`, exactly like real checkpoints. Plain PyTorch, a few seconds each.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ray.model.config import ModelConfig, llm_is_decoder
from blip2_ray.model.hf_format import quiet_save
from blip2_ray.model.language_model import build_language_model, padded_vocab
from blip2_ray.model.vision import build_vision_model


class _Progress:
    """A progress line at most every `every_s` seconds of a training loop (0: silent)."""

    def __init__(self, what: str, steps: int, every_s: float):
        self.what, self.steps, self.every_s = what, steps, every_s
        self.start = self.last = time.monotonic()

    def step(self, step: int, loss: torch.Tensor) -> None:
        now = time.monotonic()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            print(f"{self.what}: step {step + 1}/{self.steps} loss {loss.item():.3f} ({now - self.start:.0f} s)",
                  flush=True)


def pretrain_tiny_vision(
    cfg: ModelConfig, pixels: torch.Tensor, labels: list[torch.Tensor], out_dir: str,
    steps: int = 300, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, report_every_s: float = 25.0,
) -> str:
    """Train the ViT of `cfg.vision` (EVA layout) as a classifier of each label set; save HF format.

    pixels (N, 3, S, S) normalised; labels: one (N,) class-id tensor per attribute (e.g. colour, shape).
    A progress line at most every `report_every_s` seconds (0: none).
    """
    torch.manual_seed(seed)
    vision = build_vision_model(cfg.vision)
    heads = nn.ModuleList(nn.Linear(cfg.vision.hidden_size, int(y.max()) + 1) for y in labels)
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    vision.train()
    progress = _Progress("tiny ViT pre-training", steps, report_every_s)
    for step in range(steps):
        idx = torch.randint(0, pixels.shape[0], (batch_size,), generator=g)
        h = vision(pixel_values=pixels[idx]).last_hidden_state.mean(1)  # (B, D)
        loss = sum(F.cross_entropy(head(h), y[idx]) for head, y in zip(heads, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.step(step, loss)
    vision.eval()
    with quiet_save():
        vision.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _context_example(tokenizer, caption: str, words: set[str], rng: torch.Generator, ctx_len: int,
                     attrs: list[str] | None = None):
    """ids, labels of "<ctx> </s> caption \n": the context holds the caption's attribute words (or `attrs`)
    among fillers.

    A real LLM arrives able to pick up facts from its context (that is what BLIP-2's soft visual prompt
    relies on); a tiny LM trained on bare captions never learns it. Mixing in such examples teaches it.
    """
    attrs = [w for w in caption.split() if w in words] if attrs is None else list(attrs)
    fillers = [w for w in ("the", "of", "and", "with", "this", "that", "one", "image", "scene") if w not in attrs]
    picks = torch.randint(0, len(fillers), (max(0, ctx_len - len(attrs)),), generator=rng)
    ctx = attrs + [fillers[int(i)] for i in picks]
    ctx = [ctx[int(i)] for i in torch.randperm(len(ctx), generator=rng)]
    ctx_ids = tokenizer(" ".join(ctx), add_special_tokens=False).input_ids
    cap_ids = tokenizer(caption + "\n").input_ids  # starts with </s>
    return ctx_ids + cap_ids, [-100] * (len(ctx_ids) + 1) + cap_ids[1:]


def pretrain_tiny_llm(
    cfg: ModelConfig, tokenizer, captions: list[str], out_dir: str, attribute_words: list[str] | None = None,
    steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, context_share: float = 0.7,
    log_every: int = 0, context_words: list[list[str]] | None = None, report_every_s: float = 25.0,
) -> str:
    """Train the OPT of `cfg.llm` as a language model of `captions` (each ending in "\n"); save HF format.

    With `attribute_words`, a `context_share` of the examples first show the caption's attribute words
    (e.g. its colour and shape) in a shuffled context before </s>, so the LM learns to copy from its
    context, as pre-trained LLMs can. `context_words` (one list per caption): what the context shows instead
    (e.g. every attribute of the image a question/answer text is about). Loss is on the caption tokens only.
    A progress line at most every `report_every_s` seconds (0: none; `log_every`: also every N steps).
    """
    if not llm_is_decoder(cfg.llm.kind):
        raise ValueError("the tiny LLM pre-training covers OPT (the demo's LLM)")
    torch.manual_seed(seed)
    llm = build_language_model(cfg, cfg.llm.vocab_size or padded_vocab(len(tokenizer)))
    words = set(attribute_words or [])
    g = torch.Generator().manual_seed(seed)
    ctx_len = cfg.qformer.num_query_tokens
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    llm.train()
    pad = tokenizer.pad_token_id
    progress = _Progress("tiny LLM pre-training", steps, report_every_s)
    for step in range(steps):
        idx = torch.randint(0, len(captions), (batch_size,), generator=g)
        seqs = []
        for i in idx.tolist():
            if words and float(torch.rand(1, generator=g)) < context_share:
                seqs.append(_context_example(tokenizer, captions[i], words, g, ctx_len,
                                             context_words[i] if context_words else None))
            else:
                ids = tokenizer(captions[i] + "\n").input_ids
                seqs.append((ids, [-100] + ids[1:]))
        n = max(len(ids) for ids, _ in seqs)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s, _ in seqs])
        labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s, _ in seqs])
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        if log_every and step % log_every == 0:
            print(f"tiny LLM pre-training step {step}: loss {loss.item():.3f}", flush=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.step(step, loss)
    llm.eval()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with quiet_save():
        llm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
