"""The Ray actors of the evaluation passes: a model loaded once per actor, a batch of rows per call.

Rows arrive as numpy batches (runtime.compute.ModelPool, see passes.py: one pool serves every pass of an
evaluation); an image that fails to decode or to pass the data checks is dropped from the output, never raised.
"""

from __future__ import annotations

import os

import numpy as np

from blip2_ray.config import from_dict
from blip2_ray.data.config import DataConfig
from blip2_ray.runtime.compute import device_and_dtype


def decode_rows(batch: dict, size: int, data: DataConfig) -> tuple[list[int], np.ndarray]:
    """Row images (bytes or a path) -> (kept row positions, float32 (B, 3, S, S)); bad images dropped."""
    from blip2_ray.data.processor import ImageTextProcessor
    from blip2_ray.data.transforms import SkipRecord

    proc = ImageTextProcessor(data)
    keep, images = [], []
    for i in range(len(batch["idx"])):
        try:
            raw = bytes(batch["image"][i]) if len(batch["image"][i]) else open(str(batch["path"][i]), "rb").read()
            images.append(proc.decode(raw))
            keep.append(i)
        except (SkipRecord, OSError):
            continue
    return keep, proc.eval_batch(images, size)


class Stage1Actor:
    """Ray actor for retrieval. mode "image": rows {idx, path, image} -> {idx, image_feats (Q, E)};
    "text": rows {tidx, text} -> {tidx, text_feat (E,)}; "itm": image rows -> one row per candidate pair
    {idx, tidx, itm} with the positive ITM logit (the texts, or their tokens, given to the constructor; an image's
    candidate texts in its row's `cands`, else in the constructor's `pairs`). A call may name its mode, so
    one actor serves the three passes."""

    def __init__(self, model_dir: str, mode: str, dtype: str, data_cfg: dict, pairs: dict | None = None,
                 text_ids: np.ndarray | None = None, text_mask: np.ndarray | None = None, itm_batch_size: int = 128,
                 texts: list[str] | None = None):
        import torch

        from blip2_ray.weights.hf_format import load_stage1

        self.device, vdtype = device_and_dtype(dtype)
        self.model, self.tok = load_stage1(model_dir, vision_dtype=vdtype)
        self.model.to(self.device).eval()
        self.size = self.model.vision_model.config.image_size
        self.mode, self.data = mode, from_dict(DataConfig, data_cfg)
        self.pairs, self.itm_batch_size = pairs or {}, itm_batch_size
        self.own_texts = texts is not None  # text rows' tidx then index `texts`
        if texts is not None:  # the ITM pass's texts, tokenised here (the driver loads no tokenizer)
            from blip2_ray.data.processor import ImageTextProcessor

            enc = ImageTextProcessor(self.data, qformer_tokenizer=self.tok).qformer_ids(list(texts))
            text_ids, text_mask = enc["qformer_input_ids"], enc["qformer_attention_mask"]
        self.text_ids = None if text_ids is None else torch.from_numpy(text_ids)
        self.text_mask = None if text_mask is None else torch.from_numpy(text_mask)

    def __call__(self, batch: dict, mode: str | None = None) -> dict:
        import torch

        mode = mode or self.mode
        with torch.no_grad():
            if mode == "text":
                tidx = np.asarray(batch["tidx"])
                if self.own_texts:  # rows of the constructor's texts: tokenised there already
                    ids, mask = self.text_ids[torch.from_numpy(tidx)], self.text_mask[torch.from_numpy(tidx)]
                else:
                    from blip2_ray.data.processor import ImageTextProcessor

                    enc = ImageTextProcessor(self.data, qformer_tokenizer=self.tok).qformer_ids(
                        [str(t) for t in batch["text"]])
                    ids, mask = (torch.from_numpy(enc[f"qformer_{k}"]) for k in ("input_ids", "attention_mask"))
                feat = self.model.text_feat(ids.to(self.device), mask.to(self.device))
                return {"tidx": tidx, "text_feat": feat.float().cpu().numpy()}
            keep, px = decode_rows(batch, self.size, self.data)
            idx = np.asarray(batch["idx"])[keep]
            embeds = self.model.encode_image(torch.from_numpy(px).to(self.device))  # (B, N, D)
            if mode == "image":
                return {"idx": idx, "image_feats": self.model.image_feats(embeds).float().cpu().numpy()}
            cands = batch["cands"][keep] if "cands" in batch else [self.pairs.get(i) for i in idx.tolist()]
            return self._itm(idx, cands, embeds)

    def _itm(self, idx: np.ndarray, cands, embeds) -> dict:
        import torch

        img_pos, txt = [], []
        for b, ts in enumerate(cands):
            ts = np.zeros(0, np.int64) if ts is None else np.asarray(ts, np.int64)
            img_pos.extend([b] * len(ts))
            txt.extend(ts.tolist())
        out = []
        for s in range(0, len(txt), self.itm_batch_size):
            ip = torch.tensor(img_pos[s:s + self.itm_batch_size], device=self.device)
            tp = torch.tensor(txt[s:s + self.itm_batch_size])
            logits = self.model.itm_logits(embeds[ip], self.text_ids[tp].to(self.device),
                                           self.text_mask[tp].to(self.device))
            out.append(logits[:, 1].float().cpu().numpy())
        return {"idx": idx[img_pos] if img_pos else np.zeros(0, np.int64), "tidx": np.asarray(txt, np.int64),
                "itm": np.concatenate(out) if out else np.zeros(0, np.float32)}


class Stage2Actor:
    """Ray actor for caption / VQA: rows {idx, path, image, prompt} -> {idx, text} (bad images dropped)."""

    def __init__(self, model_dir: str, dtype: str, data_cfg: dict, gen: dict):
        import torch

        from blip2_ray.weights.hf_format import load_stage2
        from blip2_ray.weights.tokenizers import load_llm_tokenizer

        self.device, d = device_and_dtype(dtype)
        self.model = load_stage2(model_dir, vision_dtype=getattr(torch, d),
                                 llm_dtype=getattr(torch, d)).to(self.device).eval()
        self.tok = load_llm_tokenizer(model_dir)
        self.question_tok = None
        if self.model.takes_question:  # a VQA fine-tune (InstructBLIP layout): its Q-Former reads the prompt
            from blip2_ray.weights.tokenizers import load_qformer_tokenizer

            self.question_tok = load_qformer_tokenizer(os.path.join(model_dir, "qformer_tokenizer"))
        self.size = self.model.vision_model.config.image_size
        self.data, self.gen = from_dict(DataConfig, data_cfg), gen

    def __call__(self, batch: dict) -> dict:
        import torch

        from blip2_ray.model.prompts import generate_text

        keep, px = decode_rows(batch, self.size, self.data)
        prompts = [str(batch["prompt"][i]) for i in keep]
        if not keep:
            return {"idx": np.zeros(0, np.int64), "text": np.array([], dtype=object)}
        pixels = torch.from_numpy(px).to(self.device).to(self.model.query_tokens.dtype)
        with torch.no_grad():
            texts = generate_text(self.model, self.tok, pixels, prompts if any(prompts) else None,
                                  qformer_tokenizer=self.question_tok, question_max_len=self.data.qformer_max_len,
                                  num_beams=self.gen["num_beams"], max_new_tokens=self.gen["max_new_tokens"],
                                  min_new_tokens=self.gen["min_new_tokens"], length_penalty=self.gen["length_penalty"])
        return {"idx": np.asarray(batch["idx"])[keep], "text": np.array(texts, dtype=object)}
