"""The one owner of preprocessing: images -> model pixels, texts -> token ids and prompts, as training did them.

`ImageTextProcessor(data_cfg, tokenizers...)` is what the data pipeline (data/records.py), evaluation (eval/)
and CapFilt (capfilt/) call, and Serve builds its pixels with the same resize and normaliser (serve/images.py),
so an image or a caption reaches a model the same way everywhere. Ray-free and model-free.

Images (data/transforms.py): bounded decode -> random resized crop + flip (training) or resize (evaluation) ->
uint8 (3, S, S), what travels (4x smaller than float32) -> `PixelNormalizer` (CLIP's mean/std) on the host
or on the device the model runs on.
Texts: the Q-Former and LLM token columns at the config's lengths (`qformer_max_len`, `llm_max_len`), each
LLM family's caption end (weights/tokenizers.caption_end_ids: "\\n" for OPT, the EOS otherwise), and the
VQA prompt templates (`VQA_PROMPTS`; `DataConfig.vqa_prompt` is the one a run uses).
"""

from __future__ import annotations

import numpy as np

from blip2_ray.data.config import DataConfig
from blip2_ray.data.transforms import CLIP, PixelNormalizer, decode_image, eval_resize, train_crop

# BLIP-2's VQA prompts (the question goes into {}), by LLM kind
VQA_PROMPTS = {"decoder": "Question: {} Answer:", "t5": "Question: {} Short answer:"}


def vqa_template(llm_kind: str) -> str:
    """BLIP-2's VQA prompt of a `model.llm.kind` ("t5": FlanT5's; "decoder", "opt": the decoders')."""
    return VQA_PROMPTS["t5" if llm_kind == "t5" else "decoder"]


def vqa_prompt(question: str, llm_kind: str) -> str:
    """BLIP-2's VQA prompt for the LLM kind with `question` in it."""
    return vqa_template(llm_kind).format(question)


class ImageTextProcessor:
    """A DataConfig's preprocessing (image size, crop scale, image checks, token lengths, VQA prompt) with the
    tokenizers of the columns asked for (None: that column is not made)."""

    def __init__(self, cfg: DataConfig, *, qformer_tokenizer=None, llm_tokenizer=None, llm_family: str | None = None,
                 normalizer: PixelNormalizer = CLIP):
        self.cfg, self.normalizer = cfg, normalizer
        self.qformer_tokenizer, self.llm_tokenizer, self.llm_family = qformer_tokenizer, llm_tokenizer, llm_family

    # ---- images
    def decode(self, data: bytes | None):
        """Bytes -> RGB PIL image, checked against the config's size limits (SkipRecord when it fails)."""
        return decode_image(data, self.cfg.min_image_side, self.cfg.max_image_pixels)

    def train_pixels(self, im, rng: np.random.Generator) -> np.ndarray:
        """Random resized crop + flip -> uint8 (3, S, S)."""
        return train_crop(im, self.cfg.image_size, rng, self.cfg.min_crop_scale)

    def eval_pixels(self, im, size: int | None = None) -> np.ndarray:
        """Resize -> uint8 (3, S, S) (`size`: the model's input size, default the config's)."""
        return eval_resize(im, size or self.cfg.image_size)

    def eval_batch(self, images: list, size: int | None = None) -> np.ndarray:
        """PIL images -> normalised float32 (B, 3, S, S) on the host (evaluation, CapFilt)."""
        size = size or self.cfg.image_size
        if not images:
            return np.zeros((0, 3, size, size), np.float32)
        return self.normalizer(np.stack([self.eval_pixels(im, size) for im in images]))

    # ---- texts
    def question_prompt(self, question: str) -> str:
        """A VQA question written into the run's prompt (what the question-aware Q-Former and the LLM read)."""
        return self.cfg.vqa_prompt.format(question)

    def qformer_ids(self, texts: list[str]) -> dict[str, np.ndarray]:
        """qformer_input_ids / qformer_attention_mask int64 (B, qformer_max_len)."""
        if not texts:
            return _empty_ids("qformer", self.cfg.qformer_max_len)
        return tokenize_qformer(self.qformer_tokenizer, list(texts), self.cfg.qformer_max_len)

    def llm_ids(self, captions: list[str]) -> dict[str, np.ndarray]:
        """llm_input_ids / llm_attention_mask int64 (B, llm_max_len): captions as the LLM family is trained."""
        if not captions:
            return _empty_ids("llm", self.cfg.llm_max_len)
        return tokenize_llm(self.llm_tokenizer, list(captions), self.cfg.llm_max_len, self.llm_family)

    def vqa_llm_ids(self, prompts: list[str], answers: list[str]) -> dict[str, np.ndarray]:
        """VQA rows [prompt, answer, end] and each row's llm_prompt_length (tokenize_vqa_llm)."""
        return tokenize_vqa_llm(self.llm_tokenizer, list(prompts), list(answers), self.cfg.llm_max_len,
                                self.llm_family)


def _empty_ids(prefix: str, max_len: int) -> dict[str, np.ndarray]:
    z = np.zeros((0, max_len), np.int64)
    return {f"{prefix}_input_ids": z, f"{prefix}_attention_mask": z.copy()}


def tokenize_qformer(tok, captions: list[str], max_len: int) -> dict[str, np.ndarray]:
    """BERT ids [CLS] ... [SEP], padded to `max_len`: int64 (B, max_len) ids and attention mask."""
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {"qformer_input_ids": enc["input_ids"].astype(np.int64),
            "qformer_attention_mask": enc["attention_mask"].astype(np.int64)}


def tokenize_llm(tok, captions: list[str], max_len: int, llm_family: str | None = None) -> dict[str, np.ndarray]:
    """LLM ids right padded to `max_len`, as the family is trained: the tokenizer's own BOS handling,
    then the caption, then its end (weights.tokenizers.caption_end_ids): OPT "</s>caption\\n", Llama
    "<s>caption</s>", Qwen2 "caption<|endoftext|>", T5 "caption</s>". The end survives truncation."""
    from blip2_ray.model.caption_end import caption_end_ids

    end = caption_end_ids(tok, llm_family)
    ids = np.full((len(captions), max_len), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(captions), max_len), dtype=np.int64)
    if captions:
        body = tok(list(captions), truncation=True, max_length=max_len - len(end))["input_ids"]
        for i, row in enumerate(body):
            row = list(row) + end
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
    return {"llm_input_ids": ids, "llm_attention_mask": mask}


def tokenize_vqa_llm(tok, prompts: list[str], answers: list[str], max_len: int,
                     llm_family: str | None = None) -> dict[str, np.ndarray]:
    """VQA rows [prompt, answer, end] right padded to `max_len`, and each row's prompt length (the tokens
    that get no loss): decoders "<BOS>Question: ... Answer: red\\n" (OPT) / "... red</s>", FlanT5
    "Question: ... Short answer:</s>" then "red</s>" (models/stage2 splits it for the encoder and decoder).
    The answer is kept whole; a prompt that does not fit loses its last tokens."""
    from blip2_ray.model.caption_end import appends_eos, caption_end_ids

    end = caption_end_ids(tok, llm_family) if not appends_eos(tok) else [tok.eos_token_id]
    ids = np.full((len(prompts), max_len), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), max_len), dtype=np.int64)
    lengths = np.zeros(len(prompts), dtype=np.int64)
    if prompts:
        heads = tok(list(prompts))["input_ids"]
        tails = tok([" " + a for a in answers], add_special_tokens=False)["input_ids"]
        for i, (head, tail) in enumerate(zip(heads, tails)):
            tail = (list(tail) + end)[: max_len - 1]
            head = list(head)[: max_len - len(tail)]
            row = head + tail
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            lengths[i] = len(head)
    return {"llm_input_ids": ids, "llm_attention_mask": mask, "llm_prompt_length": lengths}
