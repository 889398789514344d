"""A request's row in the `GenerationEngine` (`Row`), the refusal at `submit` (`Rejected`), and the rows' events
on the loop (`RowEvents`, a part of the engine: admitted, each token's text delta, done, dropped, failed)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)  # rows compare by identity (the pending queue removes them)
class Row:
    """One request in the engine. `item`: {"pixel_values": uint8 (3, H, W), "prompt", "max_new_tokens",
    "min_new_tokens", "num_beams", "temperature"[, "seed"]}; `prompt_ids`: its tokens (None: no prompt),
    tokenised once, at `submit`."""

    item: dict
    prompt_ids: list[int] | None
    stream: bool
    prompt_tokens: int
    stepwise: bool = True  # False: one whole `Blip2Stage2.generate` call (beam search)
    question_ids: list[int] | None = None  # the question-aware Q-Former's tokens of the prompt
    generator: torch.Generator | None = None  # sampling rows: their own, seeded (reproducible in any batch)
    slot: int = -1  # where its keys/values are (step-wise rows, once admitted)
    n_new: int = 0  # tokens generated (counted on the generation thread, which stops the row)
    stopped: bool = False  # the generation thread has its last token
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


class Rejected(Exception):
    """A request the engine refuses at `submit`: `status` 400 (it cannot fit a KV-cache slot) or 503 (the
    queue is full; retry after `retry_after_s`)."""

    def __init__(self, status: int, type_: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.retry_after_s = status, type_, message, retry_after_s

    def error(self) -> tuple:
        """(status, type, message) as the deployments answer errors (+ retry seconds for a 503)."""
        out = (self.status, self.type, self.message)
        return out if self.retry_after_s is None else (*out, self.retry_after_s)


class RowEvents:
    """The rows' events, on the loop (a part of `GenerationEngine`: its tokenizer, `_eos` and counters)."""

    def _deliver(self, rows: list[Row], new: list[Row], tokens: list[int]) -> None:
        """One step's outcome, on the loop: the rows that joined are admitted, every row gets its token."""
        self.counters["admitted"] += len(new)
        for row in new:
            row.batch_size, row.group_size = len(rows), len(new)
            if row.stream:
                row.events.put_nowait(("admitted", None))
        for row, token in zip(rows, tokens):
            self._advance(row, token)

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
        if not row.done:
            row.done = True
            self.counters["cancelled"] += 1

    def _fail(self, row: Row, error: Exception) -> None:
        if not row.done:
            row.done = True
            row.events.put_nowait(("error", error))
