"""The tiny starting model of the instruction-tuning evidence (tests and docs/finetuning.md): a BLIP-2 whose frozen
ViT and OPT know something, with a random Q-Former, built in plain PyTorch in seconds.

- ViT: pre-trained as a classifier of the colour, shape and count of images drawn like the data's (its own draw).
- OPT: pre-trained on the instruction / response texts of every task of the generated data (the held-out one too:
  a real LLM knows how such questions are answered) after a shuffled context holding the image's attributes, so
  that it answers from the words before it, as real LLMs answer from their soft visual prompt. The texts and the
  context words are tokenised once (not per step), which makes this ~10x cheaper than tiny_backbones'
  pretrain_tiny_llm.
- The stage-2 export of both with a random Q-Former (init std 0.1: at width 32 BERT's 0.02 leaves attention almost
  uniform, docs/finetuning.md) is the start; a random stage-1 export supplies the Q-Former's text path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FILLERS = ("the", "of", "and", "with", "this", "that", "one", "image", "scene")


def pretrain_context_llm(cfg, tokenizer, texts: list[str], contexts: list[list[str]], out_dir: str,
                         steps: int = 1000, batch_size: int = 32, lr: float = 1e-2, seed: int = 0) -> str:
    """Train the OPT of `cfg.llm` on "<context> </s> text \\n" (loss on the text), the context being the example's
    words and fillers, shuffled, `cfg.qformer.num_query_tokens` words long; save it (and the tokenizer) in HF
    format. Byte-level BPE splits at spaces, so a context is the concatenation of its words' tokens."""
    from blip2_ray.model.language_model import build_language_model, padded_vocab

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    llm = build_language_model(cfg, cfg.llm.vocab_size or padded_vocab(len(tokenizer)))
    words = {w for ctx in contexts for w in ctx} | set(FILLERS)
    first = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}
    later = {w: tokenizer(" " + w, add_special_tokens=False).input_ids for w in words}
    bodies = {t: tokenizer(t + "\n").input_ids for t in set(texts)}  # starts with </s>
    ctx_len = cfg.qformer.num_query_tokens
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    llm.train()
    pad = tokenizer.pad_token_id
    for _ in range(steps):
        seqs = []
        for i in torch.randint(0, len(texts), (batch_size,), generator=g).tolist():
            attrs = list(contexts[i])
            fill = [w for w in FILLERS if w not in attrs]
            ctx = attrs + [fill[int(j)] for j in torch.randint(0, len(fill), (max(0, ctx_len - len(attrs)),),
                                                              generator=g)]
            ctx = [ctx[int(j)] for j in torch.randperm(len(ctx), generator=g)]
            ctx_ids = first[ctx[0]] + [t for w in ctx[1:] for t in later[w]]
            body = bodies[texts[i]]
            seqs.append((ctx_ids + body, [-100] * (len(ctx_ids) + 1) + body[1:]))
        n = max(len(s) for s, _ in seqs)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s, _ in seqs])
        labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s, _ in seqs])
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    llm.eval()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretrain_shapes_vit(cfg, out_dir: str, num_images: int = 1024, steps: int = 600, lr: float = 3e-3,
                        seed: int = 0) -> str:
    """The ViT of `cfg.vision` pre-trained to classify the colour, shape and count of `num_images` images drawn
    like data/sample_instruct's (its own draw, none of the instruction data's images); saved in HF format."""
    import numpy as np

    from blip2_ray.data.sample import _jpeg
    from blip2_ray.data.sample_instruct import draw_shapes
    from blip2_ray.data.transforms import decode_image, eval_transform
    from blip2_ray.model.tiny_backbones import pretrain_tiny_vision
    from blip2_ray.model.tokenizers import COLOURS, SHAPES

    rng = np.random.default_rng([seed, 17])
    pixels, labels = [], []
    for _ in range(num_images):
        c, s, n = int(rng.integers(4)), int(rng.integers(3)), int(rng.integers(1, 4))
        im = decode_image(_jpeg(draw_shapes(COLOURS[c], SHAPES[s], n, cfg.vision.image_size, rng)), 8, 1 << 30)
        pixels.append(torch.from_numpy(eval_transform(im, cfg.vision.image_size)))
        labels.append((c, s, n - 1))
    return pretrain_tiny_vision(cfg, torch.stack(pixels), [torch.tensor([lab[k] for lab in labels]) for k in range(3)],
                                out_dir, steps=steps, batch_size=64, lr=lr, seed=seed)


def build_tiny_instruct_start(data: dict, out_dir: str, seed: int = 0, llm_steps: int = 2000, llm_lr: float = 1e-2,
                              vit_steps: int = 600) -> dict:
    """From `data` (data/sample_instruct.make_instruct_sample's paths), under `out_dir`: {"vit", "llm" (the
    pre-trained frozen parts), "start" (the stage-2 export with a random Q-Former), "stage1" (a random stage-1
    export: the Q-Former's text path)}."""
    from blip2_ray.data.sample_instruct import TASK_TEMPLATES
    from blip2_ray.model.builders import build_stage1, build_stage2
    from blip2_ray.model.config import model_config
    from blip2_ray.model.hf_format import export_stage1, export_stage2
    from blip2_ray.model.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    root = data["image_root"]["train"]
    attrs = {p: a for p, a in data["attributes"].items() if os.path.dirname(p) == root}
    vit = pretrain_shapes_vit(cfg, os.path.join(out_dir, "vit"), steps=vit_steps, seed=seed)

    texts, contexts = [], []
    # yes / no is left out: the tiny OPT does not learn to answer it even from the words (46% after 2000 steps)
    for task, kind in (("colour", "vqa"), ("shape", "vqa"), ("count", "vqa"), ("describe", "caption"),
                       ("chat", "conversation")):
        for e in _entries(data[f"{task}_train"], kind):
            for template in TASK_TEMPLATES[kind]:
                texts.append(f"{template.replace('{}', e['instruction'])} {e['response']}")
                contexts.append(attrs[os.path.join(root, e["image"])])
    llm = pretrain_context_llm(cfg, tok, texts, contexts, os.path.join(out_dir, "llm"), steps=llm_steps, lr=llm_lr,
                               seed=seed)

    torch.manual_seed(seed)
    start_cfg = model_config("tiny", vision={"path": vit}, llm={"path": llm}, qformer={"initializer_range": 0.1})
    start = export_stage2(build_stage2(start_cfg, tok), os.path.join(out_dir, "start"), tok, start_cfg)
    stage1 = export_stage1(build_stage1(cfg), os.path.join(out_dir, "stage1"), qformer_tokenizer(cfg), cfg)
    return {"vit": vit, "llm": llm, "start": start, "stage1": stage1}


def _entries(path: str, kind: str) -> list[dict]:
    """{"image", "instruction" (the template's fill), "response"} of a generated annotation file."""
    with open(path) as f:
        raw = json.load(f)
    if kind == "vqa":
        return [{"image": e["image"], "instruction": e["question"], "response": e["answer"][0]} for e in raw]
    if kind == "caption":
        return [{"image": e["image"], "instruction": "", "response": e["caption"]} for e in raw]
    return [{"image": e["image"], "instruction": h["value"].replace("<image>", "").strip(), "response": g["value"]}
            for e in raw for h, g in zip(e["conversations"][0::2], e["conversations"][1::2])]
