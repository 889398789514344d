"""The engine's model work, on its generation thread (`ModelSteps`, a part of `GenerationEngine`): the sampling
settings of the running rows, the inputs of the rows that join (prefill), one decode step of the static KV
cache, and whole `Blip2Stage2.generate` calls for beam search groups."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import numpy as np
import torch

from blip2_ray.model.generation import decoder_only, next_tokens, prefill
from blip2_ray.model.prompts import pad_id_of, pad_prompts
from blip2_ray.serve.rows import Row

logger = logging.getLogger("ray.serve")


class ModelSteps:
    """The model work of `GenerationEngine`, on its generation thread (its model, slots and settings)."""

    def _settings(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = torch.tensor([r.n_new for r in rows], device=self.device)
        min_new = torch.tensor([r.item["min_new_tokens"] for r in rows], device=self.device)
        temperature = torch.tensor([float(r.item["temperature"]) for r in rows], device=self.device)
        return n, min_new, temperature

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        if all(r.generator is None and r.n_new >= r.item["min_new_tokens"] for r in rows):
            return logits.argmax(-1)  # greedy, no EOS to hold back: what next_tokens would do, without its setup
        n, min_new, temperature = self._settings(rows)
        return next_tokens(logits, n, min_new, self.eos_ids, temperature, self.top_k, self.top_p,
                           generator=[r.generator for r in rows])

    def _inputs(self, rows: list[Row]) -> dict:
        """The prefill / generate inputs of rows that all have a prompt or all have none."""
        out = {"pixel_values": self.preprocess(np.stack([r.item["pixel_values"] for r in rows]))}
        if rows[0].prompt_ids is not None:
            out["input_ids"], out["attention_mask"] = pad_prompts(
                [r.prompt_ids for r in rows], self.pad_id, decoder_only(self.model), self.device)
        if rows[0].question_ids is not None:
            out["question_ids"], out["question_mask"] = pad_prompts(
                [r.question_ids for r in rows], pad_id_of(self.qformer_tokenizer), False, self.device)
        return out

    @torch.no_grad()
    def _step(self, alive: list[Row], new: list[Row]) -> tuple[list[Row], list[int]]:
        """The alive rows compacted into slots 0..k-1 and one decode step of them, then the prefill of `new`
        into the next slots: (the rows in slot order, their new tokens)."""
        k = len(alive)
        holes = iter(sorted(set(range(k)) - {r.slot for r in alive}))
        for r in alive:
            if r.slot >= k:  # a finished row's slot takes a row from the end
                dst = next(holes)
                self.slots.move(r.slot, dst)
                r.slot = dst
        for slot in range(k, self._used):
            self.slots.release(slot)
        self._used = k
        alive = sorted(alive, key=lambda r: r.slot)
        tokens: list[int] = []
        if alive:
            chosen = self._choose(self.slots.step(k), alive)
            self.slots.set_tokens(k, chosen)
            tokens = chosen.tolist()
        joined: list[Row] = []
        for has_prompt in (True, False):
            group = [r for r in new if (r.prompt_ids is not None) == has_prompt]
            if not group:
                continue
            pre, logits = prefill(self.model, **self._inputs(group))
            chosen = self._choose(logits, group)
            self.slots.insert(pre, self._used, chosen)
            for i, r in enumerate(group):
                r.slot = self._used + i
            self._used += len(group)
            tokens += chosen.tolist()
            joined += group
        return alive + joined, tokens

    @torch.no_grad()
    def _generate_group(self, rows: list[Row]) -> list[list[int]]:
        """One `Blip2Stage2.generate` call for rows of equal settings -> each row's tokens (to its EOS)."""
        it = rows[0].item
        temperature = float(it["temperature"])
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        inputs = self._inputs(rows)
        out = self.model.generate(inputs.pop("pixel_values"), inputs.pop("input_ids", None),
                                  inputs.pop("attention_mask", None), num_beams=it["num_beams"],
                                  max_new_tokens=it["max_new_tokens"], min_new_tokens=it["min_new_tokens"],
                                  eos_token_id=self.eos_ids, **inputs, **sampling)
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
