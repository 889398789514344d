"""Generation for `Blip2Stage2`: the prompt helpers every caller shares, and step-wise decoding in static slots.

`Blip2Stage2.generate` (HF `generate`) runs a batch to its end in one call. A server wants more: each
token as soon as it exists, rows joining a running batch at a step boundary (continuous batching) and
leaving it when they finish or their client goes away, and a decode step whose shapes never change so
that it can be compiled and captured. `DecodeSlots` gives that: the KV cache of `rows` slots x `length`
positions is allocated once; a row's prompt pass (`prefill`, eager, any length) is copied into a free
slot; each decode step feeds every running row's last token at that row's own position, with a static
attention mask over the whole slot. Decoder-only LLMs (OPT, Llama, Qwen2, ...) and T5 (encoder-decoder).
Greedy decoding makes the same forward calls as HF `generate` and applies `min_new_tokens` as HF does, so
its tokens are the ones `Blip2Stage2.generate` returns (tests compare).

Within a slot, a decoder row holds [queries, prompt] from position 0 (a prompt shorter than its prefill
group's longest is left padded, mask 0) then its generated tokens; its position ids are the mask's running
count (as HF `generate` derives them: rotary LLMs would otherwise count the padding). A T5 row holds its
decoder tokens from position 0; its encoder output's cross-attention keys/values sit beside them.

The prompt helpers (`pad_prompts`, `tokenize_prompts`, `tokenize_questions`, `generate_text`) and the
stop tokens (`model.tokenizers.caption_stop_ids`) are the one definition that `Blip2Stage2.generate`'s
callers and the serving engine share.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticLayer
from transformers.modeling_outputs import BaseModelOutput

from blip2_ray.model.caption_end import caption_stop_ids
from blip2_ray.model.stage2 import Blip2Stage2, llm_kind_of

log = logging.getLogger(__name__)

# Generation-config fields that add a logits processor to HF's greedy or sampling decoding; the
# step-wise path does not apply them, so a model that sets one must use `Blip2Stage2.generate`.
_NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "min_length": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "guidance_scale": None, "watermarking_config": None,
}
CAPTURE_MODES = ("off", "compile", "cuda_graphs")


# ------------------------------------------------------------------------------------------------ prompts
def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids and mask, padded on the left (decoder prompts) or the right (T5, Q-Former)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            sl = slice(width - len(p), width) if left else slice(0, len(p))
            ids[i, sl] = torch.tensor(p, dtype=torch.long)
            mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def tokenize_prompts(tokenizer, prompts: list[str] | None, batch: int, llm_kind: str, device=None):
    """Prompts -> (input_ids, attention_mask) for `Blip2Stage2.generate` / `prefill`, or (None, None) without
    prompts: each prompt tokenised once with the tokenizer's own BOS handling, padded by `pad_prompts`
    (decoders on the left, T5 on the right)."""
    if not prompts or all(not p for p in prompts):
        return None, None
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    ids = [tokenizer(p).input_ids for p in prompts]
    return pad_prompts(ids, pad_id_of(tokenizer), llm_kind_of(llm_kind) == "decoder", device)


def question_tokens(qformer_tokenizer, text: str, max_len: int) -> list[int]:
    """The question-aware Q-Former's tokens of one prompt, as VQA training writes them ([CLS] ... [SEP],
    at most `max_len`; data/records.py tokenize_qformer)."""
    return qformer_tokenizer(text, truncation=True, max_length=max_len).input_ids


def tokenize_questions(qformer_tokenizer, prompts: list[str], max_len: int, device=None):
    """Prompts -> (question_ids, question_mask) for a question-aware Q-Former (right padded)."""
    ids = [question_tokens(qformer_tokenizer, p, max_len) for p in prompts]
    return pad_prompts(ids, pad_id_of(qformer_tokenizer), False, device)


def generate_text(
    model: Blip2Stage2,
    tokenizer,
    pixel_values: torch.Tensor,
    prompts: list[str] | None = None,
    qformer_tokenizer=None,
    question_max_len: int = 32,
    **generate_kwargs,
) -> list[str]:
    """Captions or answers as strings (prompts optional, one per image or one for all).

    A question-aware (VQA) model also reads each prompt in its Q-Former, tokenised by `qformer_tokenizer`
    as in training (at most `question_max_len` tokens)."""
    if prompts and len(prompts) == 1:
        prompts = prompts * pixel_values.shape[0]
    ids, mask = tokenize_prompts(tokenizer, prompts, pixel_values.shape[0], model.llm_kind, pixel_values.device)
    generate_kwargs.setdefault("eos_token_id", caption_stop_ids(tokenizer, model.llm_family))
    if model.takes_question and prompts:
        if qformer_tokenizer is None:
            raise ValueError("a question-aware model needs its Q-Former tokenizer to read the prompts")
        q_ids, q_mask = tokenize_questions(qformer_tokenizer, list(prompts), question_max_len, pixel_values.device)
        generate_kwargs.update(question_ids=q_ids, question_mask=q_mask)
    out = model.generate(pixel_values, ids, mask, **generate_kwargs)
    return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------ the model
def unsupported_generation_settings(generation_config) -> list[str]:
    """Names of the LLM's generation-config fields that step-wise decoding would ignore (empty: none)."""
    out = []
    for name, neutral in _NEUTRAL.items():
        value = getattr(generation_config, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, (list, tuple, dict)) and not value):
            out.append(name)
    return out


def decoder_only(model: Blip2Stage2) -> bool:
    """True for a decoder-only LLM (OPT, Llama, ...), False for an encoder-decoder one (T5)."""
    return not model.language_model.config.is_encoder_decoder


def cache_argument(lm) -> str:
    """The keyword the LLM's forward takes its KV cache by: `cache` (transformers 5.2x) or `past_key_values`
    (earlier 5.x, e.g. 5.17 on the GPU machines)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Prefilled:
    """g rows after their prompt pass. cache: the LLM's KV cache of the pass (T5: self-attention of the decoder
    start token + cross-attention of the encoder output); mask (g, P): 1 where the pass saw a real position
    (decoder: queries + prompt, left padded; T5: the encoder's input)."""

    cache: DynamicCache | EncoderDecoderCache
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """A decoder's position ids (B, T) of left-padded rows, as HF `generate` derives them (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def prefill(model: Blip2Stage2, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, question_ids: torch.Tensor | None = None,
            question_mask: torch.Tensor | None = None) -> tuple[Prefilled, torch.Tensor]:
    """Images (B, 3, H, W) + prompts (+ the Q-Former's question tokens) -> the rows' prompt pass and the
    float32 logits (B, V) of their first new token."""
    embeds, mask = model.llm_inputs(pixel_values, input_ids, attention_mask, question_ids, question_mask)
    lm = model.language_model
    cache_kw = cache_argument(lm)
    if decoder_only(model):
        # the last position by index, not `logits_to_keep=1`: that slice keeps the sequence stride, and on
        # CPU a bf16 lm_head on such a view copies the whole (V, D) weight first (3 s at OPT-2.7B width)
        last = torch.tensor([embeds.shape[1] - 1], device=embeds.device)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                 logits_to_keep=last)
        return Prefilled(_returned_cache(out), mask), out.logits[:, -1].float()
    b = embeds.shape[0]
    encoder_out = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    start = torch.full((b, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=embeds.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = lm(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=start, use_cache=True,
             **{cache_kw: cache})
    return Prefilled(_returned_cache(out), mask), out.logits[:, -1].float()


# ------------------------------------------------------------------------------------------------ static slots
class _SlotLayer(StaticLayer):
    """One attention layer's keys/values for every slot: (rows, heads, length, head_dim), allocated once.

    Self-attention: a decode step writes each row's new key/value at that row's own position
    (`slots.write_pos`; transformers' StaticLayer writes one position shared by the batch, but rows that
    joined at different steps have different lengths) and returns the first n slots whole; the static
    attention mask hides what is not the row's. Cross-attention (T5): holds the encoder's keys/values written
    at prefill, returned as they are."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: DecodeSlots, writes: bool):
        super().__init__(max_cache_len=keys.shape[2])
        self.full_keys, self.full_values = keys, values
        self.keys, self.values = keys, values
        self.slots, self.writes = slots, writes
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[0]
        keys, values = self.full_keys[:n], self.full_values[:n]
        if self.writes:
            where = self.slots.write_pos[:n].to(keys.device).view(n, 1, 1, 1)
            keys.scatter_(2, where.expand(key_states.shape), key_states.to(keys.dtype))
            values.scatter_(2, where.expand(value_states.shape), value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self):
        # T5 derives its relative position bias from this: each row's own position (n, 1), read by the
        # per-row bias `_per_row_position_bias` installs; decoders take positions from position_ids
        if not self.slots.decoder and self.writes:
            return self.slots.position[: self.slots.n, None]
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0


class _NoShortcutEncoderDecoderCache(EncoderDecoderCache):
    """T5's cache of the slots: transformers' "cross-attention already computed" shortcut reads a layer's
    `.keys` whole (every slot); here cross-attention always goes through `_SlotLayer.update`, which returns
    the first n slots."""

    @property
    def is_updated(self) -> dict:
        return {}

    @is_updated.setter
    def is_updated(self, value) -> None:
        pass


def _per_row_position_bias(lm) -> None:
    """Let T5's decoder compute its relative position bias per row: `compute_bias` given a (B, 1) tensor of
    positions (what `_SlotLayer.get_seq_length` returns) gives (B, heads, q, k); any other call is unchanged."""
    attn = lm.decoder.block[0].layer[0].SelfAttention
    if getattr(attn, "_per_row_bias", False):
        return
    original = attn.compute_bias

    def compute_bias(query_length, key_length, device=None, past_seen_tokens=0, **kwargs):
        if not (torch.is_tensor(past_seen_tokens) and past_seen_tokens.dim() == 2):
            return original(query_length, key_length, device, past_seen_tokens=past_seen_tokens, **kwargs)
        device = device if device is not None else attn.relative_attention_bias.weight.device
        context = torch.arange(query_length, device=device)[None, :, None] + past_seen_tokens.to(device)[:, :, None]
        memory = torch.arange(key_length, device=device)[None, None, :]
        bucket = attn._relative_position_bucket(memory - context, bidirectional=not attn.is_decoder,
                                                num_buckets=attn.relative_attention_num_buckets,
                                                max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # (B, heads, q, k)

    attn.compute_bias = compute_bias
    attn._per_row_bias = True


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
            return _SlotLayer(keys, values, self, writes)

        if self.decoder:
            self.cache = Cache(layers=[like(layer, True) for layer in pre.cache.layers])
        else:
            self_layers = [like(layer, True) for layer in pre.cache.self_attention_cache.layers]
            cross_layers = [like(layer, False) for layer in pre.cache.cross_attention_cache.layers]
            self.cache = _NoShortcutEncoderDecoderCache(Cache(layers=self_layers), Cache(layers=cross_layers))
            d_model = self.lm.config.d_model
            # the decoder needs an encoder output to run cross-attention; its keys/values come from the slots
            self.encoder_stub = torch.zeros(self.rows, 1, d_model, dtype=self.dtype, device=self.device)
            _per_row_position_bias(self.lm)
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

    def _layers(self) -> list[_SlotLayer]:
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


# ------------------------------------------------------------------------------------------------ choosing
def next_tokens(logits: torch.Tensor, n_generated: torch.Tensor, min_new_tokens: torch.Tensor,
                eos_ids: list[int], temperature: torch.Tensor | None = None, top_k: int = 50, top_p: float = 1.0,
                generator: torch.Generator | list[torch.Generator | None] | None = None) -> torch.Tensor:
    """The next token of each row (B,) from float32 logits (B, V).

    Rows that have generated fewer than their `min_new_tokens` cannot end (EOS scores -inf, as HF's
    MinNewTokensLengthLogitsProcessor). temperature (B,): 0 = greedy (argmax); > 0 = sampling after
    temperature, top-k and top-p, in HF's order, drawn with `generator`: one for the batch, or one per row
    (a row's draws then depend on its own seed only, not on the other rows of the batch).
    """
    scores = logits
    block = n_generated < min_new_tokens
    if bool(block.any()):
        eos = torch.tensor(eos_ids, device=logits.device)
        scores = scores.clone()
        scores[:, eos] = torch.where(block[:, None], -math.inf, scores[:, eos])
    tokens = scores.argmax(-1)
    if temperature is None or not bool((temperature > 0).any()):
        return tokens
    rows = (temperature > 0).nonzero().squeeze(1)
    s = scores[rows] / temperature[rows, None]
    if 0 < top_k < s.shape[-1]:
        kth = torch.topk(s, top_k).values[:, -1:]
        s = s.masked_fill(s < kth, -math.inf)
    if top_p < 1.0:
        sorted_s, order = torch.sort(s, descending=False)
        cum = sorted_s.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least one token
        s = s.masked_fill(drop.scatter(1, order, drop), -math.inf)
    probs = F.softmax(s, -1)
    if isinstance(generator, (list, tuple)):
        sampled = torch.cat([torch.multinomial(probs[i], 1, generator=generator[r])
                             for i, r in enumerate(rows.tolist())])
    else:
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens.index_copy(0, rows, sampled)
