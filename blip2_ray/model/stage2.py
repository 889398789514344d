"""Stage 2: the Q-Former's 32 projected query outputs become a soft visual prompt of a frozen LLM.

Attribute names follow transformers' `Blip2ForConditionalGeneration`, so weights load from and export to it as
is. Decoder-only LLMs (OPT, Llama, Qwen2, ...): loss on the caption only, which ends as model/caption_end.py says;
FlanT5: the prefix-LM split at a random point up to the caption's midpoint (`model/prefix_lm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ray.model.partitioned import full_shape
from blip2_ray.model.precision import autocast_off
from blip2_ray.model.prefix_lm import prefix_lm_split
from blip2_ray.model.qformer import run_qformer
from blip2_ray.model.question_qformer import question_pass, takes_question
from blip2_ray.model.vision import encode_image, freeze_vision


def llm_kind_of(kind: str) -> str:
    """"decoder" for any decoder-only kind ("opt" is an alias), "t5" for encoder-decoder."""
    return "t5" if kind == "t5" else "decoder"


@dataclass
class Stage2Output:
    loss: torch.Tensor
    logits: torch.Tensor  # decoder: (B, T, V), row t predicts text token t (from position t-1); T5: decoder logits

    def components(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "loss_lm": float(self.loss.detach())}


class Blip2Stage2(nn.Module):
    """Frozen ViT (+ trainable ln_vision) -> Q-Former (query path) -> language_projection -> frozen LLM.

    llm_kind: "decoder" (alias "opt") or "t5". `starts_with_bos`: the LLM tokenizer puts a BOS first
    (OPT, Llama, Mistral; not GPT-2 or Qwen2): it gets no loss and prompts go after it. `prompt_ids`
    (1, P) are prompt tokens inserted after the BOS (or before the T5 prefix) at training time; they
    get no loss.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        query_tokens: nn.Parameter,
        qformer: nn.Module,
        language_projection: nn.Linear,
        language_model: nn.Module,
        llm_kind: str,
        *,
        vision_dtype: torch.dtype = torch.float16,
        llm_dtype: torch.dtype = torch.float16,
        prompt_ids: torch.Tensor | None = None,
        starts_with_bos: bool = True,
        freeze: bool = True,
    ):
        super().__init__()
        if llm_kind not in ("decoder", "opt", "t5"):
            raise ValueError(f"llm_kind must be 'decoder' (alias 'opt') or 't5', not {llm_kind!r}")
        self.llm_kind = llm_kind_of(llm_kind)
        self.starts_with_bos = starts_with_bos and self.llm_kind == "decoder"
        self.vision_model = vision_model
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection
        self.language_model = language_model
        if prompt_ids is None:
            prompt_ids = torch.zeros(1, 0, dtype=torch.long)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        if freeze:
            freeze_vision(self.vision_model, vision_dtype)
            if any(p.dtype != llm_dtype for p in self.language_model.parameters()):
                self.language_model.to(llm_dtype)
            self.language_model.requires_grad_(False)
            self.language_model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self.vision_model, "vit_training", None) is None:
            self.vision_model.eval()  # frozen ViT; a fine-tuned one (vision.unfreeze_vision) trains
        self.language_model.eval()  # frozen LLM: no dropout; LoRA adapters on it (model/llm_lora.py) train
        for lora in (m for m in self.language_model.modules() if getattr(m, "trains_in_frozen_llm", False)):
            lora.train(mode)
        return self

    @property
    def num_query_tokens(self) -> int:
        return full_shape(self.query_tokens)[1]  # ZeRO-3 partitioned: the whole parameter's shape

    @property
    def llm_family(self) -> str:
        """The LLM's model_type ("opt", "llama", "qwen2", "t5", ...)."""
        return self.language_model.config.model_type

    def llm_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    @property
    def takes_question(self) -> bool:
        """The Q-Former reads the question next to the queries (a VQA model: model/question_qformer.py)."""
        return takes_question(self.qformer)

    def visual_prompt(self, pixel_values: torch.Tensor, question_ids: torch.Tensor | None = None,
                      question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, D_llm) query outputs projected into the LLM's embedding space.

        `question_ids` / `question_mask` (B, L): Q-Former tokens of the question, read by a question-aware
        Q-Former (`takes_question`) next to the queries; a queries-only Q-Former refuses them.
        """
        image_embeds = encode_image(self.vision_model, pixel_values)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if self.takes_question:
            out = question_pass(self.qformer, queries, image_embeds, question_ids, question_mask)
        elif question_ids is not None:
            raise ValueError("this model's Q-Former reads no text (a BLIP-2 stage-2 Q-Former); only a VQA "
                             "fine-tuned model (model/question_qformer.py) takes the question")
        else:
            out = run_qformer(self.qformer, queries, None, image_embeds, query_length=queries.shape[1])
        return self.language_projection(out.to(self.language_projection.weight.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        llm_input_ids: torch.Tensor,
        llm_attention_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        prompt_lengths: torch.Tensor | None = None,
        question_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
    ) -> Stage2Output:
        """Language-modelling loss of the captions (or answers) given the images.

        Decoder: llm_input_ids (B, T) = [BOS if the tokenizer has one, caption, end, pad...] (right
        padded; end = "\\n" for OPT, the EOS otherwise). T5: (B, T) = [caption, </s>, pad...]; the
        prefix-LM split is drawn per sample with `generator`.
        VQA (`prompt_lengths` (B,) given): each row is [prompt, answer, end] and its first prompt_lengths[b]
        tokens (BOS and the "Question: ... Answer:" prompt) get no loss; T5 reads the prompt in its
        encoder and the answer is the decoder's target. `question_ids` / `question_mask` go to a
        question-aware Q-Former (visual_prompt).
        """
        prefix = self.visual_prompt(pixel_values, question_ids, question_mask)
        if prompt_lengths is not None and self.prompt_ids.shape[1]:
            raise ValueError("VQA rows carry their own prompt; the model's fixed llm.prompt must be empty")
        if self.llm_kind == "decoder":
            return self._decoder_loss(prefix, llm_input_ids, llm_attention_mask, prompt_lengths)
        if prompt_lengths is not None:
            return self._t5_answer_loss(prefix, llm_input_ids, llm_attention_mask, prompt_lengths)
        return self._t5_loss(prefix, llm_input_ids, llm_attention_mask, generator)

    def _decoder_loss(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      prompt_lengths: torch.Tensor | None = None) -> Stage2Output:
        b, nq = prefix.shape[:2]
        lead = int(self.starts_with_bos)
        n_no_loss = lead + self.prompt_ids.shape[1]  # BOS + prompt tokens get no loss
        if self.prompt_ids.shape[1]:
            p = self.prompt_ids.to(ids.device).expand(b, -1)
            ids = torch.cat([ids[:, :lead], p, ids[:, lead:]], 1)
            mask = torch.cat([mask[:, :lead], torch.ones_like(p, dtype=mask.dtype), mask[:, lead:]], 1)
        full_mask = torch.cat([torch.ones(b, nq, dtype=mask.dtype, device=mask.device), mask], 1)
        # only the positions that predict a text token need the (large) vocabulary projection: the last
        # query's output predicts text token 0 (a first token without BOS), position nq+t-1 token t
        t = ids.shape[1]
        with autocast_off(prefix.device.type):  # the frozen LLM computes in its storage dtype
            text_embeds = self.llm_embeddings()(ids)
            embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], 1)
            out = self.language_model(inputs_embeds=embeds, logits_to_keep=t + 1,
                                      **decoder_attention(self.language_model, full_mask, embeds.dtype))
        logits = out.logits[:, :-1]  # (B, T, V)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :n_no_loss] = -100
        if prompt_lengths is not None:  # VQA: the per-row prompt gets no loss
            labels = labels.masked_fill(torch.arange(t, device=ids.device)[None] < prompt_lengths[:, None], -100)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Stage2Output(loss, logits)

    def _t5_loss(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
    ) -> Stage2Output:
        b = prefix.shape[0]
        eos = self.language_model.config.eos_token_id
        pad = self.language_model.config.pad_token_id
        enc_ids, enc_mask, labels = prefix_lm_split(ids, mask, eos, pad, generator)
        if self.prompt_ids.shape[1]:
            p = self.prompt_ids.to(ids.device).expand(b, -1)
            enc_ids = torch.cat([p, enc_ids], 1)
            enc_mask = torch.cat([torch.ones_like(p, dtype=enc_mask.dtype), enc_mask], 1)
        return self._t5_encoder_decoder_loss(prefix, enc_ids, enc_mask, labels)

    def _t5_answer_loss(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        prompt_lengths: torch.Tensor) -> Stage2Output:
        """FlanT5 VQA: rows [prompt, </s>, answer, </s>, pad...]; the encoder reads queries + the first
        prompt_lengths[b] tokens, the decoder is trained on the rest."""
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)[None]
        k = prompt_lengths[:, None]
        enc_mask = (pos < k).long()
        enc_ids = ids.masked_fill(enc_mask == 0, self.language_model.config.pad_token_id)
        labels = torch.gather(ids, 1, (pos + k).clamp(max=t - 1)).masked_fill(
            (pos + k) >= mask.sum(1, keepdim=True), -100)
        return self._t5_encoder_decoder_loss(prefix, enc_ids, enc_mask, labels)

    def _t5_encoder_decoder_loss(self, prefix: torch.Tensor, enc_ids: torch.Tensor, enc_mask: torch.Tensor,
                                 labels: torch.Tensor) -> Stage2Output:
        """The T5 loss of `labels` (B, T', -100 ignored) with [queries, enc_ids] in the encoder."""
        b, nq = prefix.shape[:2]
        full_mask = torch.cat([torch.ones(b, nq, dtype=enc_mask.dtype, device=enc_mask.device), enc_mask], 1)
        with autocast_off(prefix.device.type):  # the frozen LLM computes in its storage dtype
            text_embeds = self.llm_embeddings()(enc_ids)
            embeds = torch.cat([prefix.to(text_embeds.dtype), text_embeds], 1)
            out = self.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                      decoder_input_ids=self.language_model._shift_right(labels))
        loss = F.cross_entropy(
            out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        return Stage2Output(loss, out.logits)

    # ---- generation ----
    def llm_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, question_ids: torch.Tensor | None = None,
                   question_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What generation feeds the LLM: (B, Q + P, D) [visual prompt, prompt embeddings] and its mask, on the
        LLM's input device (`generate` and the engine's `model.generation.prefill` both start here).

        Decoder: `input_ids` are LEFT-padded prompts as the tokenizer writes them (with its BOS if it has one;
        None: just the BOS, or nothing). T5: prompts for the encoder (None: only the visual prompt).
        """
        emb = self.llm_embeddings()
        dev = emb.weight.device  # the LLM's input side (a device_map may put it apart from the ViT)
        prefix = self.visual_prompt(pixel_values, question_ids, question_mask).to(dev)
        b, nq = prefix.shape[:2]
        if input_ids is None:
            if self.starts_with_bos:
                input_ids = torch.full((b, 1), self.language_model.config.bos_token_id, dtype=torch.long, device=dev)
            else:
                input_ids = torch.zeros(b, 0, dtype=torch.long, device=dev)
        input_ids = input_ids.to(dev)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)
        embeds = torch.cat([prefix.to(emb.weight.dtype), emb(input_ids)], 1)
        mask = torch.cat([torch.ones(b, nq, dtype=attention_mask.dtype, device=dev), attention_mask], 1)
        return embeds, mask

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        question_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids (B, L) conditioned on the images and an optional prompt (inputs as `llm_inputs` takes
        them; `question_ids` / `question_mask`: the question-aware Q-Former's tokens of the question). Returns
        only the generated tokens."""
        cfg = self.language_model.config
        if pad_token_id is None:
            pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        embeds, mask = self.llm_inputs(pixel_values, input_ids, attention_mask, question_ids, question_mask)
        kwargs = dict(
            inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, do_sample=do_sample,
            pad_token_id=pad_token_id, **generate_kwargs,
        )
        if eos_token_id is not None:
            kwargs["eos_token_id"] = eos_token_id
        out = self.language_model.generate(**kwargs)
        if self.llm_kind == "t5":
            out = out[:, 1:]  # drop the decoder start token
        return out


def decoder_attention(language_model: nn.Module, keep: torch.Tensor, dtype: torch.dtype) -> dict:
    """A decoder LLM's attention inputs for right-padded rows `keep` (B, L) 1/0, built without a host read.

    transformers builds the causal mask itself from `keep`, checking `keep.all()` on the host first (a device
    sync at every step on a GPU). For its sdpa and eager attention this gives the prepared 4D mask (causal and
    padding: boolean for sdpa, additive in `dtype` for eager), which transformers takes as it is, and the
    position ids it would derive from `keep` (OPT's: kept tokens counted from 0, padding -1; at the kept tokens
    of right-padded rows that is every family's 0, 1, 2...). Other attention implementations get `keep`.
    """
    impl = getattr(language_model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return {"attention_mask": keep}
    n = keep.shape[1]
    allowed = (torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()[None] & keep.bool()[:, None, :])[:, None]
    mask = allowed if impl == "sdpa" else (~allowed).to(dtype) * torch.finfo(dtype).min
    return {"attention_mask": mask, "position_ids": (keep.cumsum(1) * keep - 1).long()}
