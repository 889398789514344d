"""Step-wise generation (prefill, decode_step, rows joining and leaving) against `Blip2Stage2.generate`."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.model.generation import (
    concat_batches,
    decode_step,
    next_tokens,
    prefill,
    select_rows,
    unsupported_generation_settings,
)
from blip2_ray.model.stage2 import tokenize_prompts


@pytest.fixture(scope="module")
def setup(varied_stage2):
    return varied_stage2  # (model, tokenizer, eos ids), tiny OPT and tiny T5: tests/unit/conftest.py


def pixels(seeds):
    return torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])


def reference(model, tok, eos, seed, prompt, max_new, min_new=1):
    ids, mask = tokenize_prompts(tok, [prompt] if prompt else None, 1, model.llm_kind)
    out = model.generate(pixels([seed]), ids, mask, num_beams=1, max_new_tokens=max_new, min_new_tokens=min_new,
                         eos_token_id=eos)[0].tolist()
    stop = next((j for j, t in enumerate(out) if t in eos), None)
    return out if stop is None else out[: stop + 1]


class Rows:
    """A minimal driver: rows of (max_new, min_new) generated step by step; finished rows leave."""

    def __init__(self, model, eos):
        self.model, self.eos = model, eos
        self.batch, self.rows = None, []  # row: {"tokens", "max", "min", "name"}

    def add(self, seeds, prompts, max_new, min_new=1):
        ids, mask = tokenize_prompts(self.tok, prompts, len(seeds), self.model.llm_kind) if prompts else (None, None)
        new, logits = prefill(self.model, pixels(seeds), ids, mask)
        rows = [{"tokens": [], "max": max_new, "min": min_new, "name": (s, p)} for s, p in
                zip(seeds, prompts or [None] * len(seeds))]
        self._take(rows, logits)
        self.batch = new if self.batch is None else concat_batches(self.batch, new)
        self.rows += rows

    def _take(self, rows, logits):
        n = torch.tensor([len(r["tokens"]) for r in rows])
        m = torch.tensor([r["min"] for r in rows])
        for r, t in zip(rows, next_tokens(logits, n, m, self.eos).tolist()):
            r["tokens"].append(t)

    def step(self):
        done = {i for i, r in enumerate(self.rows) if r["tokens"][-1] in self.eos or len(r["tokens"]) >= r["max"]}
        finished = [self.rows[i] for i in sorted(done)]
        if done:
            keep = [i for i in range(len(self.rows)) if i not in done]
            self.rows = [self.rows[i] for i in keep]
            self.batch = select_rows(self.batch, keep) if keep else None
        if self.rows:
            last = torch.tensor([r["tokens"][-1] for r in self.rows])
            self._take(self.rows, decode_step(self.model, self.batch, last))
        return finished


def test_one_batch_matches_generate(setup):
    model, tok, eos = setup
    d = Rows(model, eos)
    d.tok = tok
    prompts = ["a photo of", "two", "a picture of a red"]
    d.add([0, 1, 2], prompts, max_new=8, min_new=3)
    out = []
    while d.rows:
        out += d.step()
    assert len(out) == 3
    assert len({t for r in out for t in r["tokens"]}) >= 6  # varied outputs: a wrong cache would show
    for r in out:
        seed, prompt = r["name"]
        assert r["tokens"] == reference(model, tok, eos, seed, prompt, 8, 3), r["name"]


def test_rows_join_and_leave_a_running_batch(setup):
    model, tok, eos = setup
    d = Rows(model, eos)
    d.tok = tok
    d.add([3, 4], None, max_new=12)
    for _ in range(3):
        d.step()
    d.add([5], ["a photo of"], max_new=5, min_new=5)  # joins with a shorter cache, leaves first
    done = []
    for _ in range(2):
        done += d.step()
    d.add([6, 7], ["what is", "a"], max_new=6, min_new=2)
    while d.rows:
        done += d.step()
    assert len(done) == 5
    for r in done:
        seed, prompt = r["name"]
        assert r["tokens"] == reference(model, tok, eos, seed, prompt, r["max"], r["min"]), r["name"]


def test_min_new_tokens_blocks_eos_and_sampling_obeys_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0]])
    eos = [1]
    assert next_tokens(logits, torch.tensor([0, 0]), torch.tensor([1, 0]), eos).tolist() == [3, 0]
    assert next_tokens(logits, torch.tensor([1, 0]), torch.tensor([1, 0]), eos).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    temp = torch.tensor([0.0, 1.0])
    drawn = {next_tokens(logits, torch.tensor([5, 5]), torch.tensor([0, 0]), eos, temp, top_k=2, generator=g)[1].item()
             for _ in range(200)}
    assert drawn == {0, 3}  # the two best tokens of row 1; row 0 stays greedy
    drawn_p = {next_tokens(logits, torch.tensor([5, 5]), torch.tensor([0, 0]), eos, temp, top_k=0, top_p=0.5,
                           generator=g)[1].item() for _ in range(100)}
    assert drawn_p == {0}  # token 0 alone holds over half the probability


def test_unsupported_generation_settings():
    from transformers import GenerationConfig

    assert unsupported_generation_settings(GenerationConfig()) == []
    assert unsupported_generation_settings(GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=3)) == [
        "repetition_penalty", "no_repeat_ngram_size"]
