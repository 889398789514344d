"""Raw records -> model-ready columns, Ray-free (the same code runs in Ray tasks and in plain loops).

`process_records` decodes, validates, transforms and tokenises a list of raw records; every bad record
is dropped and reported through `on_skip(reason)`, never raised.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable

import numpy as np

from blip2_ray.data.config import DataConfig
from blip2_ray.data.transforms import (
    EMPTY_CAPTION,
    SkipRecord,
    decode_image,
    draw_choice,
    eval_resize,
    pick_caption,
    train_crop,
)

_TOKENIZERS: dict[tuple[str, str], object] = {}  # per-process cache: loading takes ~100 ms


def cached_qformer_tokenizer(path: str):
    """The Q-Former (BERT) tokenizer of the directory `path`, loaded once per process."""
    if ("qformer", path) not in _TOKENIZERS:
        from blip2_ray.model.tokenizers import load_qformer_tokenizer

        _TOKENIZERS[("qformer", path)] = load_qformer_tokenizer(path)
    return _TOKENIZERS[("qformer", path)]


def cached_llm_tokenizer(path: str):
    """The LLM tokenizer of the directory `path`, right padded (training batches), loaded once per process."""
    if ("llm", path) not in _TOKENIZERS:
        from blip2_ray.model.tokenizers import load_llm_tokenizer

        _TOKENIZERS[("llm", path)] = load_llm_tokenizer(path)
    return _TOKENIZERS[("llm", path)]


def tokenize_qformer(tok, captions: list[str], max_len: int) -> dict[str, np.ndarray]:
    """BERT ids [CLS] ... [SEP], padded to `max_len`: int64 (B, max_len) ids and attention mask."""
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {"qformer_input_ids": enc["input_ids"].astype(np.int64),
            "qformer_attention_mask": enc["attention_mask"].astype(np.int64)}


def tokenize_llm(tok, captions: list[str], max_len: int, llm_family: str | None = None) -> dict[str, np.ndarray]:
    """LLM ids right padded to `max_len`, as the family is trained: the tokenizer's own BOS handling,
    then the caption, then its end (model.tokenizers.caption_end_ids): OPT "</s>caption\\n", Llama
    "<s>caption</s>", Qwen2 "caption<|endoftext|>", T5 "caption</s>". The end survives truncation."""
    from blip2_ray.model.tokenizers import caption_end_ids

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
    from blip2_ray.model.tokenizers import appends_eos, caption_end_ids

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


def record_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Randomness of one record in one epoch: crops, flips and caption draws are reproducible."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


def process_records(records: Iterable[dict], cfg: DataConfig, *, train: bool, epoch: int = 0,
                    qformer_tokenizer_path: str | None = None, llm_tokenizer_path: str | None = None,
                    llm_family: str | None = None, on_skip: Callable[[str], None], with_pixels: bool = True,
                    record_numbers: Iterable[int] | None = None) -> dict[str, np.ndarray]:
    """Raw records {"key", "image", "caption"[, "question"]} -> a batch of columns (rows of bad records dropped).

    Columns: key (str), caption (str, cleaned), pixel_values uint8 (B, 3, S, S) RGB (train crop/flip or
    eval resize; CLIP normalisation happens on the consumer: `transforms.normalize_pixels` on the host or
    `transforms.normalize_pixels_tensor` on the device), and, per tokenizer given, qformer_/llm_ input_ids
    and attention_mask int64 (B, max_len); `llm_family` (the LLM's model_type, e.g. "opt") decides how a
    caption ends (see tokenize_llm). With `record_numbers` (one per record: its position in the shard) a
    "record" int64 column keeps the numbers of the rows that survive.
    VQA records (a "question"; "caption" holds the human answers, one drawn per visit): the question is
    written into `cfg.vqa_prompt`, which both tokenizers read (the question-aware Q-Former and the LLM), the
    LLM row is [prompt, answer, end] with an "llm_prompt_length" int64 column (tokenize_vqa_llm), and a
    "question" column keeps the question. Instruction records (an "instruction": a JSON list of filled
    templates, data/instruct.py) are VQA records whose prompt is one drawn instruction and whose answer is one
    drawn response; "question" keeps the instruction. A batch is all VQA / instruction or all caption records.
    """
    keys, captions, questions, prompts, pixels, kept = [], [], [], [], [], []
    size = cfg.image_size
    numbers = iter(record_numbers) if record_numbers is not None else None
    for r in records:
        number = next(numbers) if numbers is not None else None
        key = str(r["key"])
        rng = record_rng(cfg.seed, epoch, key)
        try:
            if r.get("image") is None:
                raise SkipRecord("missing_image")
            if r.get("instruction") is not None:  # instruction tuning (data/instruct.py): the instruction is
                # the prompt; one of its templates and one of its responses are drawn per visit
                question = str(draw_choice(r["instruction"], rng)).strip()
                if not question:
                    raise SkipRecord("empty_instruction")
                caption = str(draw_choice(r.get("caption"), rng)).strip()
                if not caption:
                    raise SkipRecord(EMPTY_CAPTION)
                prompt = question
            elif "question" in r:
                question = r["question"].decode("utf-8") if isinstance(r["question"], bytes) else r["question"]
                if not question or not str(question).strip():
                    raise SkipRecord("empty_question")
                caption = str(draw_choice(r.get("caption"), rng)).strip()  # an answer: VQA rules normalise it
                if not caption:
                    raise SkipRecord(EMPTY_CAPTION)
                prompt = cfg.vqa_prompt.format(str(question).strip())
            else:
                question = None
                caption = pick_caption(r.get("caption"), rng, cfg.max_caption_words)
            im = decode_image(r["image"], cfg.min_image_side, cfg.max_image_pixels)
            if with_pixels:
                pixels.append(train_crop(im, size, rng, cfg.min_crop_scale) if train else eval_resize(im, size))
        except SkipRecord as e:
            on_skip(e.reason)
            continue
        keys.append(key)
        captions.append(caption)
        if question is not None:
            questions.append(str(question).strip())
            prompts.append(prompt)
        kept.append(number)
    if questions and len(questions) != len(keys):
        raise ValueError("a batch mixes VQA records (with a question) and caption records")
    out = {"key": np.array(keys, dtype=object), "caption": np.array(captions, dtype=object)}
    if questions:
        out["question"] = np.array(questions, dtype=object)
    if numbers is not None:
        out["record"] = np.array(kept, dtype=np.int64)
    if with_pixels:
        out["pixel_values"] = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8)
    texts = prompts if questions else captions  # what the Q-Former reads
    if qformer_tokenizer_path:
        out.update(tokenize_qformer(cached_qformer_tokenizer(qformer_tokenizer_path), texts, cfg.qformer_max_len)
                   if texts else _empty_ids("qformer", cfg.qformer_max_len))
    if llm_tokenizer_path:
        tok = cached_llm_tokenizer(llm_tokenizer_path)
        if questions:
            out.update(tokenize_vqa_llm(tok, texts, captions, cfg.llm_max_len, llm_family))
        else:
            out.update(tokenize_llm(tok, captions, cfg.llm_max_len, llm_family)
                       if captions else _empty_ids("llm", cfg.llm_max_len))
    return out


def _empty_ids(prefix: str, max_len: int) -> dict[str, np.ndarray]:
    z = np.zeros((0, max_len), np.int64)
    return {f"{prefix}_input_ids": z, f"{prefix}_attention_mask": z.copy()}
