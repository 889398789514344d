"""The continuous-batching engine on a plain asyncio loop (no Ray): rows joining a running batch, beams,
streaming deltas and cancellation, each compared with `Blip2Stage2.generate` on the same inputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from blip2_ray.model.prompts import tokenize_prompts
from blip2_ray.serve.engine import GenerationEngine
from blip2_ray.serve.rows import Rejected


@pytest.fixture(scope="module")
def setup(varied_stage2):
    return varied_stage2  # (model, tokenizer, eos ids), tiny OPT and tiny T5: tests/unit/conftest.py


def engine(setup, **kw) -> GenerationEngine:
    model, tok, eos = setup
    return GenerationEngine(model, tok, eos, lambda px: torch.from_numpy(px), **kw)


def item(seed, prompt="", max_new=8, min_new=1, beams=1, temperature=0.0) -> dict:
    px = np.random.RandomState(seed).randn(3, 32, 32).astype(np.float32)
    return {"pixel_values": px, "prompt": prompt, "max_new_tokens": max_new, "min_new_tokens": min_new,
            "num_beams": beams, "temperature": temperature}


def reference(setup, it) -> list[int]:
    model, tok, eos = setup
    ids, mask = tokenize_prompts(tok, [it["prompt"]] if it["prompt"] else None, 1, model.llm_kind)
    out = model.generate(torch.from_numpy(it["pixel_values"])[None], ids, mask, num_beams=it["num_beams"],
                         max_new_tokens=it["max_new_tokens"], min_new_tokens=it["min_new_tokens"],
                         eos_token_id=eos)[0].tolist()
    stop = next((j for j, t in enumerate(out) if t in eos), None)
    return out if stop is None else out[: stop + 1]


async def steps(eng: GenerationEngine, n: int) -> None:
    """Wait until the engine has run `n` more iterations."""
    target = eng.counters["steps"] + n
    while eng.counters["steps"] < target:
        await asyncio.sleep(0.001)


def test_rows_joining_a_running_batch_match_generate(setup):
    items = [item(0, max_new=14, min_new=14), item(1, "a photo of", max_new=10), item(2, "two", max_new=6, min_new=3),
             item(3, max_new=9), item(4, "a picture of a", max_new=5, beams=3), item(5, max_new=7)]

    async def run():
        eng = engine(setup, max_batch_size=4, batch_wait_timeout_s=0)
        first = [eng.submit(items[0]), eng.submit(items[1])]
        await steps(eng, 3)
        later = [eng.submit(it) for it in items[2:]]  # join while the first two are generating
        results = [await r.result() for r in first + later]
        return results, eng.stats()

    results, stats = asyncio.run(run())
    assert stats["admitted"] == 6 and stats["running"] == 0 and stats["pending"] == 0
    assert results[2]["batch_size"] >= 3  # joined the running batch
    assert len({t for r in results for t in r["token_ids"]}) >= 8  # varied outputs: a wrong cache would show
    for it, r in zip(items, results):
        assert r["token_ids"] == reference(setup, it), it["prompt"]
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] in setup[2] else "length")
        assert r["text"] == setup[1].decode(r["token_ids"], skip_special_tokens=True).strip()


def test_streamed_deltas_add_up_to_the_text(setup):
    async def run():
        eng = engine(setup, batch_wait_timeout_s=0)
        row = eng.submit(item(6, "a photo of", max_new=16, min_new=16), stream=True)
        chunks = []
        async for c in row.chunks():
            chunks.append(c)
            await asyncio.sleep(0)  # a prompt reader: each step's text comes as its own chunk
        return chunks

    chunks = asyncio.run(run())
    final = chunks[-1]["done"]
    assert chunks[0]["batch_size"] == chunks[0]["group_size"] == 1  # admitted (with the first token's text)
    assert "".join(c["delta"] for c in chunks) == final["text"]
    assert sum(bool(c["delta"]) for c in chunks) >= 3 and final["completion_tokens"] == 16


def test_a_slow_reader_gets_the_text_coalesced(setup):
    async def run():
        eng = engine(setup, batch_wait_timeout_s=0)
        row = eng.submit(item(6, "a photo of", max_new=16, min_new=16), stream=True)
        while not row.done:  # generation is over before the first read
            await asyncio.sleep(0.001)
        return [c async for c in row.chunks()]

    chunks = asyncio.run(run())
    assert len(chunks) == 1 and chunks[0]["delta"] == chunks[0]["done"]["text"]


def test_a_cancelled_row_leaves_the_batch(setup):
    async def run():
        eng = engine(setup, batch_wait_timeout_s=0)
        gone = eng.submit(item(7, max_new=60, min_new=60), stream=True)
        stay = eng.submit(item(8, "a photo of", max_new=20))
        await steps(eng, 4)
        gone.cancel()
        await steps(eng, 2)
        mid = eng.stats()
        return await stay.result(), mid, eng.stats(), len(gone.tokens)

    result, mid, end, n_gone = asyncio.run(run())
    assert mid["running"] <= 1 and end["cancelled"] == 1 and n_gone < 10
    assert result["token_ids"] == reference(setup, item(8, "a photo of", max_new=20))


def test_sampling_rows_decode_with_greedy_rows(setup):
    async def run():
        eng = engine(setup, batch_wait_timeout_s=0.01)
        rows = [eng.submit(item(9, max_new=6, min_new=6, temperature=1.5)), eng.submit(item(9, max_new=6))]
        return [await r.result() for r in rows]

    sampled, greedy = asyncio.run(run())
    assert sampled["completion_tokens"] == 6 and sampled["batch_size"] == 2
    assert greedy["token_ids"] == reference(setup, item(9, max_new=6))


def test_a_beam_search_stream_is_one_piece_at_the_end(setup):
    async def run():
        eng = engine(setup, batch_wait_timeout_s=0)
        row = eng.submit(item(10, "a photo of", max_new=6, min_new=6, beams=3), stream=True)
        return [c async for c in row.chunks()]

    chunks = asyncio.run(run())
    assert [bool(c["delta"]) for c in chunks] == [True] and chunks[0]["delta"] == chunks[0]["done"]["text"]
    assert chunks[0]["done"]["token_ids"] == reference(setup, item(10, "a photo of", max_new=6, min_new=6, beams=3))


def test_a_request_that_does_not_fit_a_slot_is_a_400_naming_the_limit(setup):
    model, _, _ = setup
    eng = engine(setup, max_seq_len=model.num_query_tokens + 6)
    with pytest.raises(Rejected) as e:
        eng.submit(item(0, "a photo of", max_new=6))
    assert e.value.status == 400 and "max_seq_len" in e.value.message and str(eng.slot_length) in e.value.message
    room = eng.slot_length - model.num_query_tokens - int(model.starts_with_bos)  # no prompt: at most the BOS
    if model.llm_kind == "decoder":
        eng.check_fits(int(model.starts_with_bos), room)  # exactly full: accepted
        with pytest.raises(Rejected):
            eng.check_fits(int(model.starts_with_bos), room + 1)


def test_a_full_queue_is_a_503_with_retry_after(setup):
    async def run():
        eng = engine(setup, max_batch_size=1, max_pending=2)
        rows = [eng.submit(item(i, max_new=4)) for i in range(2)]  # the queue: 2 waiting
        with pytest.raises(Rejected) as e:
            eng.submit(item(2, max_new=4))
        return e.value, [await r.result() for r in rows]

    refused, results = asyncio.run(run())
    assert refused.error() == (503, "overloaded", refused.message, 1) and "queue is full" in refused.message
    assert [len(r["token_ids"]) > 0 for r in results] == [True, True]


def test_sampling_is_reproducible_under_a_seed(setup):
    sampled = dict(max_new=8, min_new=8, temperature=30.0)  # near-uniform over the top-k: seeds differ

    async def run():
        eng = engine(setup, batch_wait_timeout_s=0.01)
        alone = await eng.submit({**item(11, **sampled), "seed": 5}).result()
        rows = [eng.submit(item(12, "a photo of", max_new=5)), eng.submit({**item(11, **sampled), "seed": 5}),
                eng.submit({**item(11, **sampled), "seed": 6})]
        return alone, [await r.result() for r in rows]

    alone, (_, again, other) = asyncio.run(run())
    assert again["token_ids"] == alone["token_ids"] and again["batch_size"] >= 2  # same seed, another batch
    assert other["token_ids"] != alone["token_ids"]


def test_a_failed_capture_decodes_eager_with_one_warning(setup, caplog):
    it = item(13, "a photo of", max_new=6, min_new=6)
    with caplog.at_level("WARNING"):
        eng = engine(setup, capture="cuda_graphs")  # no CUDA here: the capture fails at start-up
    warnings = [r for r in caplog.records if "capturing the decode step" in r.getMessage()]
    assert len(warnings) == 1 and "decoding eager" in warnings[0].getMessage()
    assert eng.stats()["decode_step"] == "off"

    async def run():
        return await eng.submit(it).result()

    assert asyncio.run(run())["token_ids"] == reference(setup, it)
