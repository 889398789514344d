"""Step-wise generation in static slots (prefill, DecodeSlots: rows joining, leaving, compacted; the decode
step eager and compiled) against `Blip2Stage2.generate`, and the shared prompt helpers."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.model.decode_slots import DecodeSlots, batch_buckets
from blip2_ray.model.generation import next_tokens, prefill, unsupported_generation_settings
from blip2_ray.model.prompts import pad_prompts, tokenize_prompts


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
    """A minimal driver of `DecodeSlots` as the engine drives it: running rows in slots 0..n-1, a finished
    row's slot taken by the last row."""

    def __init__(self, model, tok, eos, capture="off", rows=4):
        self.model, self.tok, self.eos = model, tok, eos
        self.slots = DecodeSlots(model, rows, 48, capture, compile_backend="aot_eager")
        self.slots.start(pixels([99]))
        self.rows = []  # {"tokens", "max", "min", "name"}, in slot order

    def _take(self, rows, logits):
        n = torch.tensor([len(r["tokens"]) for r in rows])
        m = torch.tensor([r["min"] for r in rows])
        chosen = next_tokens(logits, n, m, self.eos)
        for r, t in zip(rows, chosen.tolist()):
            r["tokens"].append(t)
        return chosen

    def add(self, seeds, prompts, max_new, min_new=1):
        ids, mask = tokenize_prompts(self.tok, prompts, len(seeds), self.model.llm_kind) if prompts else (None, None)
        pre, logits = prefill(self.model, pixels(seeds), ids, mask)
        rows = [{"tokens": [], "max": max_new, "min": min_new, "name": (s, p)} for s, p in
                zip(seeds, prompts or [None] * len(seeds))]
        self.slots.insert(pre, len(self.rows), self._take(rows, logits))
        self.rows += rows

    def step(self):
        done = [i for i, r in enumerate(self.rows) if r["tokens"][-1] in self.eos or len(r["tokens"]) >= r["max"]]
        finished = [self.rows[i] for i in done]
        for i in sorted(done, reverse=True):  # the last row takes the finished row's slot
            last = len(self.rows) - 1
            if i != last:
                self.slots.move(last, i)
                self.rows[i] = self.rows[last]
            self.slots.release(last)
            self.rows.pop()
        if self.rows:
            n = len(self.rows)
            self.slots.set_tokens(n, self._take(self.rows, self.slots.step(n)))
        return finished


def test_one_batch_matches_generate(setup):
    model, tok, eos = setup
    d = Rows(model, tok, eos)
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


def test_rows_join_and_leave_the_compiled_step(setup):
    """Rows joining at different steps (different lengths in their slots), leaving (slots compacted), in the
    compiled decode step (traced and functionalised: backend aot_eager; make bench-gpu-serve runs inductor)."""
    model, tok, eos = setup
    d = Rows(model, tok, eos, capture="compile", rows=6)
    assert d.slots.captured == "compile", d.slots.capture_error
    d.add([3, 4], None, max_new=12)
    for _ in range(3):
        d.step()
    d.add([5], ["a photo of"], max_new=5, min_new=5)  # joins with a longer prompt, leaves first
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


def test_a_prefill_longer_than_a_slot_is_refused_and_buckets_cover_the_rows(setup):
    model, tok, eos = setup
    slots = DecodeSlots(model, 2, 6)  # fewer positions than the queries
    pre, _ = prefill(model, pixels([0]))
    with pytest.raises(ValueError, match="does not fit"):
        slots.insert(pre, 0, torch.zeros(1, dtype=torch.long))
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(8) == [1, 2, 4, 8]


def test_prompts_are_padded_as_the_tokenizer_pads_them(setup):
    _, tok, _ = setup
    prompts = ["a photo of", "two", "a picture of a red"]
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(prompts, padding="longest", return_tensors="pt")
        ids, mask = pad_prompts([tok(p).input_ids for p in prompts], tok.pad_token_id, side == "left")
        assert torch.equal(ids, enc.input_ids) and torch.equal(mask, enc.attention_mask)
    tok.padding_side = "right"


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


def test_per_row_generators_make_a_rows_draws_independent_of_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    temp, zeros = torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3, dtype=torch.long)

    def draws(seeds, rows):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return [next_tokens(logits[rows], zeros[rows], zeros[rows], [0], temp[rows], top_k=0,
                            generator=[gens[i] for i in range(len(rows))]).tolist() for _ in range(20)]

    alone = [d[0] for d in draws([7], [2])]
    in_batch = [d[2] for d in draws([3, 5, 7], [0, 1, 2])]
    assert alone == in_batch and len(set(alone)) > 3  # same seed, same draws, whoever shares the batch


def test_unsupported_generation_settings():
    from transformers import GenerationConfig

    assert unsupported_generation_settings(GenerationConfig()) == []
    assert unsupported_generation_settings(GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=3)) == [
        "repetition_penalty", "no_repeat_ngram_size"]
