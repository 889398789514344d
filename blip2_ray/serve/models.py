"""The model deployments' classes (wrapped with `serve.deployment` in `app.py`).

`CaptionDeployment` answers caption, VQA and chat through the continuous-batching `GenerationEngine`:
`generate(item)` returns the whole answer, `generate_stream(item)` (a streaming handle call) yields it
as it grows. `RetrievalDeployment` answers embeddings and match with a stage-1 model, batching
concurrent requests with `@serve.batch`. Requests arrive validated by the ingress, their images as
resized uint8 (3, H, W) numpy, normalised here on the replica's device.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ray import serve

from blip2_ray.serve.engine import GenerationEngine
from blip2_ray.serve.images import pixel_normalizer
from blip2_ray.serve.rows import Rejected


def qformer_text_length(qformer_cfg, qformer) -> int:
    """How many Q-Former text tokens a model reads: `model.qformer.max_text_len` of its recorded ModelConfig
    (`qformer_cfg`; None: a directory that records none, the default), within its Q-Former's position table."""
    from blip2_ray.model.config import QFormerConfig

    return min((qformer_cfg or QFormerConfig()).max_text_len, qformer.config.max_position_embeddings)


class CaptionDeployment:
    """A stage-2 model. item: {"pixel_values": uint8 (3, H, W), "prompt": str, "question": bool (the prompt
    is a question, asked with the model's VQA prompt), "max_new_tokens", "min_new_tokens", "num_beams",
    "temperature"[, "seed"]} (temperature 0: greedy or beam search; > 0: sampling).

    A question-aware VQA fine-tune (InstructBlipForConditionalGeneration layout) reads each prompt in its
    Q-Former too, tokenised by the directory's `qformer_tokenizer/` as in training (InstructBLIP's processor
    gives the same text to both tokenizers). `llm_quantization: int8` stores the LLM's block weights in int8
    (model/quantize.py).
    """

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32",
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, gpus_per_replica: float = 1.0,
                 max_seq_len: int = 256, decode_capture: str = "off", llm_quantization: str = "none",
                 max_pending: int | None = None):
        from blip2_ray.model.caption_end import caption_stop_ids
        from blip2_ray.serve.placement import load_caption_model
        from blip2_ray.weights.tokenizers import load_llm_tokenizer, load_qformer_tokenizer
        from blip2_ray.weights.weight_sources import read_model_config

        # in the serving dtype directly; with gpus_per_replica > 1 the LLM is split over the replica's GPUs
        self.model = load_caption_model(model_dir, device, dtype, gpus_per_replica, llm_quantization)
        self.device = self.model.query_tokens.device
        self.tokenizer = load_llm_tokenizer(model_dir)
        question = {}
        if self.model.takes_question:
            recorded = read_model_config(model_dir)
            question = {"qformer_tokenizer": load_qformer_tokenizer(os.path.join(model_dir, "qformer_tokenizer")),
                        "question_max_len": qformer_text_length(recorded and recorded.qformer, self.model.qformer)}
        self.engine = GenerationEngine(
            self.model, self.tokenizer, caption_stop_ids(self.tokenizer, self.model.llm_family),
            pixel_normalizer(model_dir, self.device), max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s, max_seq_len=max_seq_len, capture=decode_capture,
            max_pending=max_pending, **question,
        )
        self.requests = 0  # calls that reached this replica

    def replica_actor_name(self) -> str:
        """This replica's Ray actor name (tests kill it to check the replica is replaced)."""
        import ray

        return ray.get_runtime_context().get_actor_name()

    def stats(self) -> dict:
        """Requests that reached this replica; the engine's rows running and waiting now, and its counters
        (admitted, finished, cancelled, steps)."""
        return {"requests": self.requests, **self.engine.stats()}

    def _prompted(self, item: dict) -> dict:
        from blip2_ray.data.processor import vqa_prompt

        if not item.get("question"):
            return item
        return {**item, "prompt": vqa_prompt(item["prompt"], self.model.llm_kind), "question": False}

    async def generate(self, item: dict) -> dict:
        """The whole answer: {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
        "batch_size", "group_size"} or {"error": (status, type, message[, retry-after seconds])}."""
        self.requests += 1
        try:
            row = self.engine.submit(self._prompted(item))
        except Rejected as e:  # does not fit a KV-cache slot (400), or the queue is full (503)
            return {"error": e.error()}
        try:
            return await row.result()
        finally:
            row.cancel()  # a caller that went away (cancelled request): its row leaves the batch

    async def generate_stream(self, item: dict):
        """Yields {"delta": str, "batch_size", "group_size"} as the text grows (the first one, with an empty
        delta, once the row is admitted), the last one with "done": the result `generate` returns; or one
        {"error": ...}. Deltas of steps the caller has not consumed yet go out together."""
        self.requests += 1
        try:
            row = self.engine.submit(self._prompted(item), stream=True)
        except Rejected as e:
            yield {"error": e.error()}
            return
        try:
            async for chunk in row.chunks():
                yield chunk
        finally:
            row.cancel()


class RetrievalDeployment:
    """A stage-1 model: normalised ITC features of images and texts, and ITM match probabilities.

    Concurrent requests of one kind are grouped by `@serve.batch` into one forward pass; each runs on
    the replica's loop (one short forward; requests arriving meanwhile form the next batch).
    """

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005):
        from blip2_ray.weights.hf_format import load_stage1

        self.device = torch.device(device)
        model, self.tokenizer = load_stage1(model_dir, vision_dtype=dtype)
        self.model = model.to(self.device).eval()
        self.normalise = pixel_normalizer(model_dir, self.device)
        self.text_length = qformer_text_length(model.cfg.qformer, model.qformer)
        for method in (self._images_batch, self._texts_batch, self._match_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _tokens(self, texts: list[str]):
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.text_length,
                             return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    async def embed_images(self, pixel_values: np.ndarray) -> dict:
        """uint8 (B, 3, H, W) -> {"queries": (B, Q, E), "pooled": (B, E)} normalised ITC features, "batch_size"."""
        return await self._images_batch(pixel_values)

    async def embed_texts(self, texts: list[str]) -> dict:
        """{"features": (N, E) normalised ITC text features, "tokens": their token count, "batch_size"}."""
        return await self._texts_batch(texts)

    async def match(self, pixel_values: np.ndarray, texts: list[str]) -> dict:
        """One image uint8 (1, 3, H, W) against N texts: {"itm", "itc"} each (N,), and "batch_size"."""
        return await self._match_batch((pixel_values, texts))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _images_batch(self, requests: list[np.ndarray]) -> list[dict]:
        with torch.no_grad():
            embeds = self.model.encode_image(self.normalise(np.concatenate(requests)))
            feats = self.model.image_feats(embeds)  # (B, Q, E)
            pooled = torch.nn.functional.normalize(feats.mean(1), dim=-1)
        feats, pooled = feats.float().cpu().numpy(), pooled.float().cpu().numpy()
        out, start = [], 0
        for px in requests:
            end = start + len(px)
            out.append({"queries": feats[start:end], "pooled": pooled[start:end], "batch_size": len(requests)})
            start = end
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _texts_batch(self, requests: list[list[str]]) -> list[dict]:
        ids, mask = self._tokens([t for texts in requests for t in texts])
        with torch.no_grad():
            feats = self.model.text_feat(ids, mask).float().cpu().numpy()
        counts = mask.sum(1).tolist()
        out, start = [], 0
        for texts in requests:
            end = start + len(texts)
            out.append({"features": feats[start:end], "tokens": int(sum(counts[start:end])),
                        "batch_size": len(requests)})
            start = end
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _match_batch(self, requests: list[tuple[np.ndarray, list[str]]]) -> list[dict]:
        counts = [len(texts) for _, texts in requests]
        owner = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts)).to(self.device)  # (N,)
        with torch.no_grad():
            embeds = self.model.encode_image(self.normalise(np.concatenate([px for px, _ in requests])))  # once each
            feats = self.model.image_feats(embeds)  # (B, Q, E)
            ids, mask = self._tokens([t for _, texts in requests for t in texts])
            text = self.model.text_feat(ids, mask)  # (N, E)
            # max over the queries of each text's own image, as in training (without temp)
            itc = torch.einsum("ne,nqe->nq", text, feats[owner]).max(dim=1).values
            itm = self.model.itm_logits(embeds[owner], ids, mask).softmax(-1)[:, 1]
        itc, itm = itc.float().cpu().numpy(), itm.float().cpu().numpy()
        out, start = [], 0
        for n in counts:
            out.append({"itm": itm[start:start + n], "itc": itc[start:start + n], "batch_size": len(requests)})
            start += n
        return out
