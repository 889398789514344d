"""Continuous batching for the caption deployment (no Ray here: it runs on any asyncio loop).

One scheduler task runs on the replica's event loop; the model work of each iteration (one decode
step of the running rows + the prefill of the rows that join) runs on one generation thread, so the
loop stays free to admit requests and stream tokens while the model computes. Rows join the running
batch at step boundaries and leave it when they finish or their caller cancels them.

Why a thread per step and not one `generate` call in a thread: HF `generate` holds the GIL in long
Python stretches (tiny models are nothing but Python), and a loop starved of the GIL admits requests
so slowly that batches stay small. Here the thread returns to the loop after every step, and the
tensor kernels in between release the GIL.

Greedy and sampled rows decode step-wise (`blip2_ray.model.generation`); beam search rows run as a
whole `Blip2Stage2.generate` call per group of equal settings (their answer arrives in one piece).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from blip2_ray.model.generation import (
    DecodeBatch,
    concat_batches,
    decode_step,
    decoder_only,
    next_tokens,
    prefill,
    select_rows,
    unsupported_generation_settings,
)

logger = logging.getLogger("ray.serve")


@dataclass(eq=False)  # rows compare by identity (the pending queue removes them)
class Row:
    """One request in the engine. `item`: {"pixel_values": uint8 (3, H, W), "prompt", "max_new_tokens",
    "min_new_tokens", "num_beams", "temperature"}; `prompt_ids`: its tokens (None: no prompt)."""

    item: dict
    prompt_ids: list[int] | None
    stream: bool
    prompt_tokens: int
    stepwise: bool = True  # False: one whole `Blip2Stage2.generate` call (beam search)
    tokens: list[int] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: str = ""  # text streamed so far
    cancelled: bool = False
    done: bool = False
    batch_size: int = 0
    group_size: int = 0

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (no-op once done)."""
        self.cancelled = True

    async def result(self) -> dict:
        """The final result {"text", "token_ids", "finish_reason", ...} (raises what the model raised)."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    async def chunks(self):
        """Dicts {"delta": new text, "batch_size", "group_size"} as the row advances: the first once it is
        admitted (delta ""), the last with "done": the result. Events that piled up while the caller was
        busy go out as one chunk. Raises what the model raised."""
        while True:
            parts = [await self.events.get()]
            while not self.events.empty():
                parts.append(self.events.get_nowait())
            chunk = {"delta": "", "batch_size": self.batch_size, "group_size": self.group_size}
            for kind, value in parts:
                if kind == "error":
                    raise value
                if kind == "delta":
                    chunk["delta"] += value
                elif kind == "done":
                    chunk["done"] = value
            yield chunk
            if "done" in chunk:
                return


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids and mask, padded as `tokenize_prompts` pads (decoders left, T5 right)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if left else slice(0, len(p))
        ids[i, sl] = torch.tensor(p, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


class GenerationEngine:
    """Continuous batching of caption/VQA/chat requests over one `Blip2Stage2`.

    preprocess: uint8 (B, 3, H, W) numpy -> normalised pixel values on the model's device.
    At most `max_batch_size` rows decode together. When nothing runs, the first request waits up to
    `batch_wait_timeout_s` for others to share its prefill, but only if requests arrived while the last
    batch ran: a replica that serves one request at a time answers each at once.
    """

    def __init__(self, model, tokenizer, eos_ids: list[int], preprocess, *, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.eos_ids = list(eos_ids)
        self._eos = set(self.eos_ids)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.device = model.query_tokens.device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        gen_cfg = model.language_model.generation_config
        self.top_k = gen_cfg.top_k if gen_cfg.top_k is not None else 0
        self.top_p = gen_cfg.top_p if gen_cfg.top_p is not None else 1.0
        self.unsupported = unsupported_generation_settings(gen_cfg)
        if self.unsupported:
            logger.warning("the LLM's generation config sets %s: every request runs as one whole generate call "
                           "(no token streaming, no continuous batching)", ", ".join(self.unsupported))
        self._pending: deque[Row] = deque()
        self._running: list[Row] = []
        self._batch: DecodeBatch | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._arrived_while_busy = 0  # requests submitted while rows were running, since the engine was idle
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0}

    # ---------------------------------------------------------------- the callers' side
    def submit(self, item: dict, stream: bool = False) -> Row:
        """Queue one request (call on the loop); its Row yields the events."""
        prompt_ids = self.tokenizer(item["prompt"]).input_ids if item["prompt"] else None
        n_prompt = len(prompt_ids) if prompt_ids else int(self.model.starts_with_bos)
        stepwise = item["num_beams"] == 1 and not self.unsupported
        row = Row(item, prompt_ids, stream, self.model.num_query_tokens + n_prompt, stepwise)
        if self._running:
            self._arrived_while_busy += 1
        self._pending.append(row)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())
        self._wake.set()
        return row

    def stats(self) -> dict:
        """Rows running and waiting now, and counters since start."""
        running = sum(not (r.done or r.cancelled) for r in self._running)
        return {"running": running, "pending": len(self._pending), **self.counters}

    # ---------------------------------------------------------------- the scheduler (on the loop)
    async def _schedule(self) -> None:
        while True:
            if not self._pending and not self._running:
                self._wake.clear()
                await self._wake.wait()
            if not self._running:
                if self._arrived_while_busy:  # concurrent traffic: let the first prefill be shared
                    await self._let_batch_fill()
                self._arrived_while_busy = 0
            try:
                await self._iteration()
            except Exception as e:  # a bug here must fail the waiting callers, not leave them hanging
                logger.exception("the generation scheduler failed")
                for row in [*self._running, *self._pending]:
                    self._fail(row, e)
                self._running, self._batch = [], None
                self._pending.clear()

    async def _let_batch_fill(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_timeout_s
        while len(self._pending) < self.max_batch_size:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _iteration(self) -> None:
        for row in [r for r in self._pending if r.cancelled]:
            self._pending.remove(row)
            self._drop(row)
        whole = [r for r in self._pending if not r.stepwise][: self.max_batch_size]
        if whole:
            for row in whole:
                self._pending.remove(row)
            await self._run_whole(whole)
            return
        keep = [i for i, r in enumerate(self._running) if not (r.done or r.cancelled)]
        for r in self._running:
            if r.cancelled and not r.done:
                self._drop(r)
        new: list[Row] = []
        while self._pending and len(keep) + len(new) < self.max_batch_size:
            new.append(self._pending.popleft())
        new.sort(key=lambda r: r.prompt_ids is None)  # prompted rows, then the others: one prefill each
        if not keep and not new:
            self._running, self._batch = [], None
            return
        running = [self._running[i] for i in keep]
        loop = asyncio.get_running_loop()
        try:
            tokens = await loop.run_in_executor(self._thread, self._step, keep, running, new)
        except Exception as e:  # a model failure fails the rows it touched, never the scheduler
            logger.exception("generation failed")
            for row in running + new:
                self._fail(row, e)
            self._running, self._batch = [], None
            return
        self.counters["steps"] += 1
        self.counters["admitted"] += len(new)
        self._running = running + new
        for row in new:
            row.batch_size, row.group_size = len(self._running), len(new)
            if row.stream:
                row.events.put_nowait(("admitted", None))
        for row, token in zip(self._running, tokens):
            self._advance(row, token)

    # ---------------------------------------------------------------- model work (the generation thread)
    def _settings(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = torch.tensor([len(r.tokens) for r in rows], device=self.device)
        min_new = torch.tensor([r.item["min_new_tokens"] for r in rows], device=self.device)
        temperature = torch.tensor([float(r.item["temperature"]) for r in rows], device=self.device)
        return n, min_new, temperature

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        n, min_new, temperature = self._settings(rows)
        return next_tokens(logits, n, min_new, self.eos_ids, temperature, self.top_k, self.top_p).tolist()

    @torch.no_grad()
    def _step(self, keep: list[int], running: list[Row], new: list[Row]) -> list[int]:
        """One decode step of the kept running rows, then the prefill of `new`: tokens of running + new."""
        tokens: list[int] = []
        if self._batch is not None and len(keep) < len(self._batch):
            self._batch = select_rows(self._batch, keep) if keep else None
        if running:
            last = torch.tensor([r.tokens[-1] for r in running], device=self.device)
            tokens = self._choose(decode_step(self.model, self._batch, last), running)
        for has_prompt in (True, False):
            group = [r for r in new if (r.prompt_ids is not None) == has_prompt]
            if not group:
                continue
            pixels = self.preprocess(np.stack([r.item["pixel_values"] for r in group]))
            ids = mask = None
            if has_prompt:
                ids, mask = pad_prompts([r.prompt_ids for r in group], self.pad_id,
                                        decoder_only(self.model), self.device)
            batch, logits = prefill(self.model, pixels, ids, mask)
            tokens += self._choose(logits, group)
            self._batch = batch if self._batch is None else concat_batches(self._batch, batch)
        return tokens

    @torch.no_grad()
    def _generate_group(self, rows: list[Row]) -> list[list[int]]:
        """One `Blip2Stage2.generate` call for rows of equal settings -> each row's tokens (to its EOS)."""
        it = rows[0].item
        pixels = self.preprocess(np.stack([r.item["pixel_values"] for r in rows]))
        ids = mask = None
        if rows[0].prompt_ids is not None:
            ids, mask = pad_prompts([r.prompt_ids for r in rows], self.pad_id, decoder_only(self.model),
                                    self.device)
        temperature = float(it["temperature"])
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(pixels, ids, mask, num_beams=it["num_beams"], max_new_tokens=it["max_new_tokens"],
                                  min_new_tokens=it["min_new_tokens"], eos_token_id=self.eos_ids, **sampling)
        results = []
        for row in out.tolist():
            stop = next((j for j, t in enumerate(row) if t in self._eos), None)
            results.append(row if stop is None else row[: stop + 1])
        return results

    async def _run_whole(self, rows: list[Row]) -> None:
        groups: dict[tuple, list[Row]] = defaultdict(list)
        for r in rows:
            it = r.item
            key = (it["max_new_tokens"], it["min_new_tokens"], it["num_beams"], it["temperature"], r.prompt_ids is None)
            groups[key].append(r)
        loop = asyncio.get_running_loop()
        for group in groups.values():
            try:
                outs = await loop.run_in_executor(self._thread, self._generate_group, group)
            except Exception as e:
                logger.exception("generation failed")
                for row in group:
                    self._fail(row, e)
                continue
            self.counters["admitted"] += len(group)
            for row, tokens in zip(group, outs):
                row.batch_size = row.group_size = len(group)
                if row.stream:
                    row.events.put_nowait(("admitted", None))
                row.tokens = tokens
                stopped = bool(tokens) and tokens[-1] in self._eos
                self._finish(row, "stop" if stopped else "length")

    # ---------------------------------------------------------------- rows' events (on the loop)
    def _advance(self, row: Row, token: int) -> None:
        if row.cancelled:  # cancelled during the step: it leaves at the next one
            return
        row.tokens.append(token)
        if token in self._eos:
            self._finish(row, "stop")
        elif len(row.tokens) >= row.item["max_new_tokens"]:
            self._finish(row, "length")
        elif row.stream:
            delta = self._delta(self.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip(), row)
            if delta:
                row.events.put_nowait(("delta", delta))

    @staticmethod
    def _delta(text: str, row: Row, final: bool = False) -> str:
        """The new text since the last chunk; an unfinished UTF-8 character and trailing spaces wait."""
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text.rstrip()  # the final text is stripped: spaces go out with the word after them
        if not text.startswith(row.sent):
            return ""
        delta, row.sent = text[len(row.sent):], text
        return delta

    def _finish(self, row: Row, reason: str) -> None:
        row.done = True
        self.counters["finished"] += 1
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        if row.stream:
            delta = self._delta(text, row, final=True)
            if delta:
                row.events.put_nowait(("delta", delta))
        row.events.put_nowait(("done", {
            "text": text, "token_ids": list(row.tokens), "completion_tokens": len(row.tokens),
            "prompt_tokens": row.prompt_tokens, "finish_reason": reason,
            "batch_size": row.batch_size, "group_size": row.group_size,
        }))

    def _drop(self, row: Row) -> None:
        row.done = True
        self.counters["cancelled"] += 1

    def _fail(self, row: Row, error: Exception) -> None:
        if not row.done:
            row.done = True
            row.events.put_nowait(("error", error))
