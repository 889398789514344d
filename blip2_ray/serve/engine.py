"""Continuous batching for the caption deployment (no Ray here: it runs on any asyncio loop).

One scheduler task runs on the replica's event loop and admits requests; the model work runs on one
generation thread: decode steps of the running rows back to back (the prefill of rows that join at the
first), each step's tokens handed to the loop without waiting for it, until requests wait that could join.
The loop stays free to admit requests and stream tokens while the model computes, and a step never waits
for the loop. Rows join the running batch at step boundaries and leave it when they finish or their caller
cancels them.

Why not one `generate` call in a thread: HF `generate` holds the GIL in long Python stretches (tiny models
are nothing but Python), and a loop starved of the GIL admits requests so slowly that batches stay small.
Here the thread yields the GIL after every step, and the tensor kernels in between release it.

Greedy and sampled rows decode step-wise in the replica's static KV cache (`model.decode_slots.DecodeSlots`:
`max_batch_size` slots of `max_seq_len` positions, allocated and its decode step captured at start-up);
the running rows hold slots 0..n-1 (a finished row's slot is taken by the last row). Beam search rows run
as a whole `Blip2Stage2.generate` call per group of equal settings (their answer arrives in one piece).
A request that cannot fit a slot, or that finds the queue full, is refused at `submit` (`Rejected`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from blip2_ray.model.decode_slots import DecodeSlots
from blip2_ray.model.generation import decoder_only, unsupported_generation_settings
from blip2_ray.model.prompts import pad_id_of, question_tokens
from blip2_ray.serve.model_steps import ModelSteps
from blip2_ray.serve.rows import Rejected, Row, RowEvents

logger = logging.getLogger("ray.serve")


class GenerationEngine(ModelSteps, RowEvents):
    """Continuous batching of caption/VQA/chat requests over one `Blip2Stage2`.

    preprocess: uint8 (B, 3, H, W) numpy -> normalised pixel values on the model's device.
    At most `max_batch_size` rows decode together, each in a slot of `max_seq_len` positions (capped by
    the LLM's position table) of the static KV cache allocated here; `capture` ("off", "compile",
    "cuda_graphs") is how its decode step runs (`DecodeSlots`; a failed capture decodes eager, with one
    warning). At most `max_pending` requests wait for a slot (None: unbounded); one more is `Rejected` (503).
    When nothing runs, the first request waits up to `batch_wait_timeout_s` for others to share its prefill,
    but only if requests arrived while the last batch ran: a replica that serves one request at a time
    answers each at once. A question-aware model (`model.takes_question`) reads each prompt in its Q-Former
    too, tokenised by `qformer_tokenizer` (at most `question_max_len` tokens), as VQA training does.
    Sampled rows draw from their own generator, seeded by the item's "seed" or by the engine's `seed` and
    the request's arrival number: the same seed gives the same tokens whatever else is in the batch.
    """

    def __init__(self, model, tokenizer, eos_ids: list[int], preprocess, *, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, max_seq_len: int = 256, capture: str = "off",
                 max_pending: int | None = None, qformer_tokenizer=None, question_max_len: int = 32,
                 seed: int = 0, compile_backend: str = "inductor"):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.eos_ids = list(eos_ids)
        self._eos = set(self.eos_ids)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_pending = max_pending
        self.device = model.query_tokens.device
        self.pad_id = pad_id_of(tokenizer)
        if model.takes_question and qformer_tokenizer is None:
            raise ValueError("a question-aware model needs its Q-Former tokenizer (qformer_tokenizer)")
        self.qformer_tokenizer, self.question_max_len = qformer_tokenizer, question_max_len
        gen_cfg = model.language_model.generation_config
        self.top_k = gen_cfg.top_k if gen_cfg.top_k is not None else 0
        self.top_p = gen_cfg.top_p if gen_cfg.top_p is not None else 1.0
        self.unsupported = unsupported_generation_settings(gen_cfg)
        if self.unsupported:
            logger.warning("the LLM's generation config sets %s: every request runs as one whole generate call "
                           "(no token streaming, no continuous batching)", ", ".join(self.unsupported))
        lm_cfg = model.language_model.config
        limit = None if lm_cfg.is_encoder_decoder else (
            getattr(lm_cfg, "max_position_embeddings", None) or getattr(lm_cfg, "n_positions", None))
        self.slot_length = min(max_seq_len, limit) if limit else max_seq_len
        self.slot_limit = ("max_seq_len" if self.slot_length == max_seq_len
                           else "the model's max_position_embeddings")
        self.slots = DecodeSlots(model, max_batch_size, self.slot_length, capture, compile_backend)
        size = model.vision_model.config.image_size
        self.slots.start(torch.zeros(1, 3, size, size, device=self.device))  # allocate + capture, at start-up
        self._seed, self._arrivals = seed, 0
        self._pending: deque[Row] = deque()
        self._running: list[Row] = []  # step-wise rows, in slot order (row i holds slot i)
        self._used = 0  # slots 0.._used-1 hold rows (running or just finished)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._arrived_while_busy = 0  # requests submitted while rows were running, since the engine was idle
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "steps": 0}

    # ---------------------------------------------------------------- the callers' side
    def prompt_tokens(self, prompt: str) -> list[int] | None:
        return self.tokenizer(prompt).input_ids if prompt else None

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        """`Rejected` (400) when a prompt of `n_prompt` tokens (no prompt: the BOS, if the tokenizer has one)
        and `max_new_tokens` new tokens do not fit a KV-cache slot."""
        nq, length = self.model.num_query_tokens, self.slot_length
        if decoder_only(self.model):
            if nq + n_prompt + max_new_tokens <= length:
                return
            msg = (f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) + the image's {nq} query "
                   f"positions exceed the {length} positions of a KV-cache slot ({self.slot_limit}): at most "
                   f"{length - nq} prompt + new tokens")
        else:
            if nq + n_prompt <= length and max_new_tokens + 1 <= length:
                return
            msg = (f"prompt ({n_prompt} tokens) + the image's {nq} query positions, or max_new_tokens "
                   f"({max_new_tokens}) + 1, exceed the {length} positions of a KV-cache slot ({self.slot_limit})")
        raise Rejected(400, "invalid_request_error", msg)

    def submit(self, item: dict, stream: bool = False) -> Row:
        """Queue one request (call on the loop); its Row yields the events. Raises `Rejected` for a request
        that cannot fit a slot (400) or when `max_pending` requests already wait (503)."""
        prompt_ids = self.prompt_tokens(item["prompt"])  # the request's one tokenisation
        n_prompt = len(prompt_ids) if prompt_ids else int(self.model.starts_with_bos)
        self.check_fits(n_prompt, item["max_new_tokens"])
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            raise Rejected(503, "overloaded", f"the replica's queue is full ({self.max_pending} requests wait for "
                                              f"one of its {self.max_batch_size} slots); retry later", 1)
        stepwise = item["num_beams"] == 1 and not self.unsupported
        row = Row(item, prompt_ids, stream, self.model.num_query_tokens + n_prompt, stepwise)
        if self.model.takes_question and item["prompt"]:
            row.question_ids = question_tokens(self.qformer_tokenizer, item["prompt"], self.question_max_len)
        self._arrivals += 1
        if float(item["temperature"]) > 0:
            seed = item.get("seed")
            row.generator = torch.Generator(self.device).manual_seed(
                int(seed) if seed is not None else self._seed * 1_000_003 + self._arrivals)
        if self._running:
            self._arrived_while_busy += 1
        self._pending.append(row)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())
        self._wake.set()
        return row

    def stats(self) -> dict:
        """Rows running and waiting now, counters since start, and how the decode step runs."""
        running = sum(not (r.done or r.cancelled) for r in self._running)
        return {"running": running, "pending": len(self._pending), **self.counters,
                "decode_step": self.slots.captured}

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
                self._running, self._used = [], self.max_batch_size  # the next step frees every slot
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
        alive = [r for r in self._running if not (r.stopped or r.cancelled)]
        for r in self._running:
            if r.cancelled and not r.done:
                self._drop(r)
        new: list[Row] = []
        while self._pending and len(alive) + len(new) < self.max_batch_size:
            new.append(self._pending.popleft())
        new.sort(key=lambda r: r.prompt_ids is None)  # prompted rows, then the others: one prefill each
        if not alive and not new:
            self._running = []
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._run_steps, alive, new, loop)
        except Exception as e:  # a model failure fails the rows it touched, never the scheduler
            logger.exception("generation failed")
            for row in {*self._running, *alive, *new}:
                self._fail(row, e)
            self._running, self._used = [], self.max_batch_size  # the next step frees every slot
            return

    # ---------------------------------------------------------------- model work (the generation thread)
    def _run_steps(self, alive: list[Row], new: list[Row], loop) -> None:
        """Decode steps, back to back, until no row runs or requests wait that could join: each step's tokens
        go to the loop as they come (`_deliver`), without waiting for it. Rows stop here as the loop will
        finish them (EOS, `max_new_tokens`) and leave when their caller cancels them."""
        rows = alive
        while True:
            rows, tokens = self._step(rows, new)
            self._running = rows
            self.counters["steps"] += 1
            for row, token in zip(rows, tokens):
                row.n_new += 1
                row.stopped = token in self._eos or row.n_new >= row.item["max_new_tokens"]
            loop.call_soon_threadsafe(self._deliver, rows, new, tokens)
            for r in rows:
                if r.cancelled and not r.stopped:  # its caller went away: it leaves at the next step
                    loop.call_soon_threadsafe(self._drop, r)
            rows = [r for r in rows if not (r.stopped or r.cancelled)]
            waiting = list(self._pending)  # a copy: the loop appends to it meanwhile
            if not rows or (waiting and (len(rows) < self.max_batch_size or any(not r.stepwise for r in waiting))):
                return
            new = []
            time.sleep(0)  # let the loop take the GIL: it admits requests and streams while this decodes
