"""`DecodeSlots`: a replica's static KV cache (`rows` slots x `length` positions, allocated once) and its decode
step, eager, compiled or captured as CUDA graphs (see `model.generation` for the row layout in a slot).

A row's prompt pass (`model.generation.prefill`) is copied into a free slot; each decode step feeds every
running row's last token at that row's own position, with a static attention mask over the whole slot. The
per-layer buffers are `model.slot_layers.SlotLayer`."""

from __future__ import annotations

import logging
import types

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput

from blip2_ray.model.generation import Prefilled, cache_argument, decoder_only, prefill
from blip2_ray.model.slot_layers import NoShortcutEncoderDecoderCache, SlotLayer, per_row_position_bias
from blip2_ray.model.stage2 import Blip2Stage2

log = logging.getLogger(__name__)


CAPTURE_MODES = ("off", "compile", "cuda_graphs")


def _own_code(method):
    """`method` with a code object of its own: torch.compile keeps compiled graphs (and their recompile limit)
    per code object, so each `DecodeSlots` gets its own (and frees it with itself)."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)


def batch_buckets(rows: int) -> list[int]:
    """The batch sizes a captured decode step is specialised for: powers of two below `rows`, and `rows`."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


class DecodeSlots:
    """A replica's static KV cache (`rows` slots x `length` positions, allocated once) and its decode step.

    The caller keeps its running rows in slots 0..n-1: `insert` copies a prefill into slots start..start+g-1,
    `move` compacts (a finished row's slot takes the last row), `release` frees a slot; `step(n)` feeds
    `tokens[:n]` and returns the logits (n, V) of the next tokens, at the smallest bucket >= n.

    capture: "off" (eager), "compile" (torch.compile, inductor; on CUDA each bucket's compiled step is then
    captured as a CUDA graph and replayed), "cuda_graphs" (the eager step captured as CUDA graphs, CUDA
    only). A capture that fails at `start` falls back to eager with one warning (`capture_error` says why).
    """

    def __init__(self, model: Blip2Stage2, rows: int, length: int, capture: str = "off",
                 compile_backend: str = "inductor"):
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, not {capture!r}")
        self.model, self.lm = model, model.language_model
        self.rows, self.length, self.capture = rows, length, capture
        self.compile_backend = compile_backend  # tests: "aot_eager" (traced and functionalised, no code generation)
        self.compile_options: dict | None = None  # inductor options (None: the defaults below)
        self.decoder = decoder_only(model)
        emb = model.llm_embeddings()
        self.device, self.dtype = emb.weight.device, emb.weight.dtype
        cfg = self.lm.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_position = (limit - 1) if (limit and self.decoder) else length
        self.cache_kw = cache_argument(self.lm)
        z = dict(dtype=torch.long, device=self.device)
        self.mask = torch.zeros(rows, length, **z)  # 1: the slot position holds one of the row's keys
        self.write_pos = torch.zeros(rows, **z)  # where the row's next key goes
        self.position = torch.zeros(rows, **z)  # the position id of the row's next token
        self.tokens = torch.zeros(rows, **z)  # the row's last token (the next step's input)
        self.encoder_mask = None if self.decoder else torch.zeros(rows, length, **z)
        self.n = rows
        self.cache = None
        self.buckets = batch_buckets(rows)
        self.captured: str = "off"  # what `step` runs: "off", "compile", "cuda_graphs", "compile+cuda_graphs"
        self.capture_error: str | None = None
        self._fn = self._decode
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # ------------------------------------------------------------------ allocation and start-up
    def _allocate(self, pre: Prefilled) -> None:
        """The buffers, sized and placed as the prefill's cache layers (a device_map puts each layer on its own
        device): (rows, heads, length, head_dim) per layer."""
        def like(layer, writes):
            k, v = layer.keys, layer.values
            keys = k.new_zeros(self.rows, k.shape[1], self.length, k.shape[3])
            values = v.new_zeros(self.rows, v.shape[1], self.length, v.shape[3])
            return SlotLayer(keys, values, self, writes)

        if self.decoder:
            self.cache = Cache(layers=[like(layer, True) for layer in pre.cache.layers])
        else:
            self_layers = [like(layer, True) for layer in pre.cache.self_attention_cache.layers]
            cross_layers = [like(layer, False) for layer in pre.cache.cross_attention_cache.layers]
            self.cache = NoShortcutEncoderDecoderCache(Cache(layers=self_layers), Cache(layers=cross_layers))
            d_model = self.lm.config.d_model
            # the decoder needs an encoder output to run cross-attention; its keys/values come from the slots
            self.encoder_stub = torch.zeros(self.rows, 1, d_model, dtype=self.dtype, device=self.device)
            per_row_position_bias(self.lm)
        for t in (self.mask, self.write_pos, self.position, self.tokens):
            torch._dynamo.mark_static_address(t)

    def cache_bytes(self) -> int:
        """Bytes of the allocated KV buffers."""
        if self.cache is None:
            return 0
        caches = [self.cache] if self.decoder else [self.cache.self_attention_cache, self.cache.cross_attention_cache]
        return sum(t.numel() * t.element_size() for c in caches for layer in c.layers
                   for t in (layer.full_keys, layer.full_values))

    @torch.no_grad()
    def start(self, pixel_values: torch.Tensor) -> None:
        """Allocate the cache from a prefill of `pixel_values` (one image) and capture the decode step of every
        bucket (as `capture` says); then clear every slot. A capture failure falls back to eager, with one
        warning."""
        pre, _ = prefill(self.model, pixel_values)
        self._allocate(pre)
        if self.capture != "off":
            try:
                self._capture(pre)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler or of graph capture
                self.capture_error = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.warning("capturing the decode step (%s) failed (%s); decoding eager", self.capture,
                            self.capture_error)
                self._fn, self._graphs, self.captured = self._decode, {}, "off"
        for slot in range(self.rows):
            self.release(slot)

    def _capture(self, pre: Prefilled) -> None:
        cuda = self.device.type == "cuda"
        if self.capture == "cuda_graphs" and not cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        fn = self._decode
        if self.capture == "compile":
            options = self.compile_options
            if options is None and not cuda and self.compile_backend == "inductor":
                # batch 1 on CPU: each (1, K) x (K, N) matmul as a fused C++ reduction instead of one library
                # call per linear layer (the calls, not the arithmetic, are a small model's decode step)
                options = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
            fn = torch.compile(_own_code(self._decode), dynamic=None, backend=self.compile_backend, options=options)
        for b in self.buckets:  # fill the buckets with the prefilled row: real values, as a step would see
            for slot in range(b):
                self.insert(pre, slot, torch.zeros(1, dtype=torch.long, device=self.device))
            if not cuda:
                fn(self.tokens[:b])  # compiles the bucket
                continue
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (compilation, lazy initialisations)
                    fn(self.tokens[:b])
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(self.tokens[:b])
            self._graphs[b] = (graph, out)
        self._fn = fn
        self.captured = {("compile", False): "compile", ("compile", True): "compile+cuda_graphs"}.get(
            (self.capture, cuda), "cuda_graphs")

    # ------------------------------------------------------------------ rows in and out
    @torch.no_grad()
    def insert(self, pre: Prefilled, start: int, first_tokens: torch.Tensor) -> None:
        """Copy the g rows of a prefill into slots start..start+g-1; `first_tokens` (g,): their first new tokens
        (the next step's input)."""
        if self.cache is None:
            self._allocate(pre)
        g, p = pre.mask.shape
        if start + g > self.rows:
            raise ValueError(f"slots {start}..{start + g - 1} do not exist: there are {self.rows}")
        if p >= self.length:
            raise ValueError(f"a prefill of {p} positions does not fit slots of {self.length}")
        rows = slice(start, start + g)
        if self.decoder:
            pairs = zip(self.cache.layers, pre.cache.layers)
            self.mask[rows] = 0
            self.mask[rows, :p] = pre.mask
            self.write_pos[rows] = p
            self.position[rows] = pre.mask.sum(1)
        else:
            pairs = [*zip(self.cache.self_attention_cache.layers, pre.cache.self_attention_cache.layers),
                     *zip(self.cache.cross_attention_cache.layers, pre.cache.cross_attention_cache.layers)]
            self.mask[rows] = 0
            self.mask[rows, 0] = 1  # the decoder start token
            self.write_pos[rows] = 1
            self.position[rows] = 1
            self.encoder_mask[rows] = 0
            self.encoder_mask[rows, :p] = pre.mask
        for slot_layer, layer in pairs:
            n = layer.keys.shape[2]
            slot_layer.full_keys[rows, :, :n] = layer.keys
            slot_layer.full_values[rows, :, :n] = layer.values
        self.tokens[rows] = first_tokens

    def _layers(self) -> list[SlotLayer]:
        if self.decoder:
            return list(self.cache.layers)
        return [*self.cache.self_attention_cache.layers, *self.cache.cross_attention_cache.layers]

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s row into slot `dst` (the caller then releases `src`)."""
        for layer in self._layers():
            layer.full_keys[dst] = layer.full_keys[src]
            layer.full_values[dst] = layer.full_values[src]
        state = [self.mask, self.write_pos, self.position, self.tokens]
        for t in state + ([] if self.decoder else [self.encoder_mask]):
            t[dst] = t[src]

    @torch.no_grad()
    def release(self, slot: int) -> None:
        """Free a slot: an empty row (a bucket larger than the running rows decodes it harmlessly)."""
        for t in (self.mask, self.write_pos, self.position, self.tokens):
            t[slot] = 0
        if not self.decoder:
            self.encoder_mask[slot] = 0

    def set_tokens(self, n: int, tokens: torch.Tensor) -> None:
        """The next step's input tokens of rows 0..n-1."""
        self.tokens[:n] = tokens

    # ------------------------------------------------------------------ the step
    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def step(self, n: int) -> torch.Tensor:
        """Feed rows 0..n-1 their last token; the float32 logits (n, V) of their next one."""
        b = self.bucket(n)
        graph = self._graphs.get(b)
        if graph is not None:
            graph[0].replay()
            return graph[1][:n]
        if self.captured != "compile":
            return self._fn(self.tokens[:b])[:n]
        # compiled, no graphs (CPU): every bucket was compiled at `start` and nothing the guards check changes
        # afterwards (a frozen model, a code object of its own), the case torch documents for evaluating only
        # the guards that tell its compiled graphs apart (the others cost a third of a small model's step)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self._fn(self.tokens[:b])[:n]

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask (B, T) as the additive (B, 1, 1, T) attention mask transformers passes through as is."""
        return (1 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step of rows 0..b-1 (b = len(tokens)): one token each, at each row's own position."""
        b = tokens.shape[0]
        self.n = b
        write_pos = self.write_pos[:b]
        mask = self.mask[:b]
        mask.scatter_(1, write_pos[:, None], 1)  # the new token's own position
        kw = {self.cache_kw: self.cache, "use_cache": True}
        if self.decoder:
            out = self.lm(input_ids=tokens[:, None], attention_mask=self._additive(mask),
                          position_ids=self.position[:b, None], logits_to_keep=1, **kw)
        else:
            out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_stub[:b]),
                          attention_mask=self._additive(self.encoder_mask[:b]), decoder_input_ids=tokens[:, None],
                          decoder_attention_mask=self._additive(mask), **kw)
        # an empty slot of the bucket advances too: clamped, it never leaves its row or the position table
        write_pos.add_(1).clamp_(max=self.length - 1)
        self.position[:b].add_(1).clamp_(max=self.max_position)
        return out.logits[:, -1].float()
