"""Raw records -> model-ready columns, Ray-free (the same code runs in Ray tasks and in plain loops).

`process_records` decodes, validates, transforms and tokenises a list of raw records (data/processor.py, the
one owner of preprocessing, does each step at the config's sizes and lengths); every bad record
is dropped and reported through `on_skip(reason)`, never raised.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable

import numpy as np

from blip2_ray.data.config import DataConfig
from blip2_ray.data.processor import ImageTextProcessor
from blip2_ray.data.transforms import EMPTY_CAPTION, SkipRecord, draw_choice, pick_caption

_TOKENIZERS: dict[tuple[str, str], object] = {}  # per-process cache: loading takes ~100 ms


def cached_qformer_tokenizer(path: str, tokenizer_class: str | None = None):
    """The Q-Former (BERT) tokenizer of the directory `path`, loaded once per process (with `tokenizer_class`,
    `tokenizer_classes`' name for it, without importing torch: weights.tokenizers.load_tokenizer)."""
    if ("qformer", path) not in _TOKENIZERS:
        from blip2_ray.weights.tokenizers import load_qformer_tokenizer

        _TOKENIZERS[("qformer", path)] = load_qformer_tokenizer(path, tokenizer_class)
    return _TOKENIZERS[("qformer", path)]


def cached_llm_tokenizer(path: str, tokenizer_class: str | None = None):
    """The LLM tokenizer of the directory `path`, right padded (training batches), loaded once per process
    (`tokenizer_class`: as for cached_qformer_tokenizer)."""
    if ("llm", path) not in _TOKENIZERS:
        from blip2_ray.weights.tokenizers import load_llm_tokenizer

        _TOKENIZERS[("llm", path)] = load_llm_tokenizer(path, tokenizer_class)
    return _TOKENIZERS[("llm", path)]


def tokenizer_classes(qformer_tokenizer_path: str | None, llm_tokenizer_path: str | None) -> dict[str, str | None]:
    """process_records' `qformer_tokenizer_class` / `llm_tokenizer_class` for these directories: the classes
    AutoTokenizer loads them with, found here once (a driver: an unreadable tokenizer fails here, in one sentence),
    so that the processes that only tokenise (the decode tasks) load them without AutoTokenizer and torch."""
    from blip2_ray.weights.tokenizers import tokenizer_class_name

    def class_of(path: str | None, load) -> str | None:
        return tokenizer_class_name(load(path)) if path else None

    return {"qformer_tokenizer_class": class_of(qformer_tokenizer_path, cached_qformer_tokenizer),
            "llm_tokenizer_class": class_of(llm_tokenizer_path, cached_llm_tokenizer)}


def record_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Randomness of one record in one epoch: crops, flips and caption draws are reproducible."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


def process_records(records: Iterable[dict], cfg: DataConfig, *, train: bool, epoch: int = 0,
                    qformer_tokenizer_path: str | None = None, llm_tokenizer_path: str | None = None,
                    llm_family: str | None = None, on_skip: Callable[[str], None], with_pixels: bool = True,
                    record_numbers: Iterable[int] | None = None, qformer_tokenizer_class: str | None = None,
                    llm_tokenizer_class: str | None = None) -> dict[str, np.ndarray]:
    """Raw records {"key", "image", "caption"[, "question"]} -> a batch of columns (rows of bad records dropped).

    Columns: key (str), caption (str, cleaned), pixel_values uint8 (B, 3, S, S) RGB (train crop/flip or
    eval resize; CLIP normalisation happens on the consumer: `transforms.normalize_pixels` on the host or
    `transforms.normalize_pixels_tensor` on the device), and, per tokenizer given, qformer_/llm_ input_ids
    and attention_mask int64 (B, max_len); `llm_family` (the LLM's model_type, e.g. "opt") decides how a
    caption ends (processor.tokenize_llm); `*_tokenizer_class` (tokenizer_classes) load them without torch.
    With `record_numbers` (one per record: its position in the shard) a "record" int64 column keeps the numbers
    of the rows that survive.
    VQA records (a "question"; "caption" holds the human answers, one drawn per visit): the question is
    written into `cfg.vqa_prompt`, which both tokenizers read (the question-aware Q-Former and the LLM), the
    LLM row is [prompt, answer, end] with an "llm_prompt_length" int64 column (processor.tokenize_vqa_llm), and a
    "question" column keeps the question. Instruction records (an "instruction": a JSON list of filled
    templates, data/instruct.py) are VQA records whose prompt is one drawn instruction and whose answer is one
    drawn response; "question" keeps the instruction. A batch is all VQA / instruction or all caption records.
    """
    keys, captions, questions, prompts, pixels, kept = [], [], [], [], [], []
    size = cfg.image_size
    proc = ImageTextProcessor(cfg, qformer_tokenizer=qformer_tokenizer_path and cached_qformer_tokenizer(
        qformer_tokenizer_path, qformer_tokenizer_class), llm_tokenizer=llm_tokenizer_path and cached_llm_tokenizer(
        llm_tokenizer_path, llm_tokenizer_class), llm_family=llm_family)
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
                prompt = proc.question_prompt(str(question).strip())
            else:
                question = None
                caption = pick_caption(r.get("caption"), rng, cfg.max_caption_words)
            im = proc.decode(r["image"])
            if with_pixels:
                pixels.append(proc.train_pixels(im, rng) if train else proc.eval_pixels(im))
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
        out.update(proc.qformer_ids(texts))
    if llm_tokenizer_path:
        out.update(proc.vqa_llm_ids(texts, captions) if questions else proc.llm_ids(captions))
    return out
