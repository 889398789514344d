"""Frozen image encoders: EVA ViT-g/14 (HF `Blip2VisionModel` layout) and CLIP ViT-L/14.

The trunk is frozen: half-precision weights, eval mode, no grad, computed in its storage dtype even under
autocast. Its last LayerNorm, BLIP-2's `ln_vision`, is the exception: it trains and runs in float32. In
HF's layout that LayerNorm is `vision_model.post_layernorm`, so freezing "the ViT" must leave it alone.
`construct_vision_model` allocates the trunk directly in its storage dtype: as a seeded random init, or on the
meta device for the tensors of a weight file (weights/vision.py, `build_vision_model`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ray.model.config import VisionConfig, ln_vision_eps
from blip2_ray.model.partitioned import (
    FrozenConstruction,
    default_dtype,
    parameters_on_meta,
    set_parameter_dtype,
)
from blip2_ray.model.precision import autocast_off

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a torch dtype or its config name ("float16", "bfloat16", "float32")."""
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[str(dtype).removeprefix("torch.")]


class ClipVisionTower(nn.Module):
    """CLIP ViT-L/14 without its last layer (23 of 24) plus the trainable `post_layernorm` (ln_vision)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
            )
        )
        self.config = self.clip.config
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=ln_vision_eps(cfg))

    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.clip  # transformers 5: CLIPVisionModel holds embeddings / pre_layrnorm / encoder itself
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))
        return vm.encoder(inputs_embeds=h).last_hidden_state


def vision_module(cfg: VisionConfig) -> nn.Module:
    """The image encoder's module for `cfg`, created under the caller's dtype / device contexts."""
    if cfg.kind == "clip_vit_l":
        return ClipVisionTower(cfg)
    from transformers import Blip2VisionConfig, Blip2VisionModel

    return Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps,
            # HF's default (1e-10) makes a randomly initialised ViT map every image to the same tokens
            initializer_range=0.02,
        )
    )


def construct_vision_model(cfg: VisionConfig, construction: FrozenConstruction | None = None, *,
                           weights_follow: bool = False) -> nn.Module:
    """The image encoder, not yet frozen: trunk in `cfg.dtype`, ln_vision (post_layernorm) in float32.

    A seeded random init (seeded by the caller); `weights_follow`: its parameters are left for a weight file
    (on the meta device, or, partitioned, without the random init; weights/vision.py reads them).
    `construction` (ZeRO-3, model/partitioned.py): built partitioned over the ranks, about 1/world of it each.
    """
    dtype = DTYPES[cfg.dtype]
    if construction is not None:
        with default_dtype(dtype), construction.context():
            model = vision_module(cfg)
        construction.finish(model, not weights_follow)
    else:
        with default_dtype(dtype), parameters_on_meta() if weights_follow else contextlib.nullcontext():
            model = vision_module(cfg)
    # ln_vision in float32 before any weight arrives (a file's float32 ln_vision is not rounded on the way)
    set_parameter_dtype(model.post_layernorm, torch.float32)
    model.post_layernorm.eps = ln_vision_eps(cfg)
    return model


def freeze_vision(vision_model: nn.Module, dtype: torch.dtype) -> None:
    """Freeze the trunk in `dtype` and eval mode; keep `post_layernorm` (ln_vision) trainable in float32.

    Parameters already in `dtype` are left in place (no copy).
    """
    for name, p in vision_model.named_parameters():
        if name.startswith("post_layernorm."):
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
        else:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            p.requires_grad_(False)
    vision_model.eval()


def vision_trunk(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) hidden states before ln_vision, in the trunk's storage dtype.

    Frozen trunk: no grad and autocast off inside (the frozen weights are used as stored: an fp16 trunk
    computes in fp16 under bf16 autocast too; the pixels are cast to that dtype by the embeddings). A
    trunk made trainable by `unfreeze_vision` computes with grad under the caller's autocast, with its
    gradient checkpointing and drop path.
    """
    training = getattr(vision_model, "vit_training", None)
    if training is not None:
        return _trainable_trunk(vision_model, pixel_values, training)
    with torch.no_grad(), autocast_off(pixel_values.device.type):
        if isinstance(vision_model, ClipVisionTower):
            return vision_model.trunk(pixel_values)
        emb = vision_model.embeddings(pixel_values.to(vision_model.embeddings.patch_embedding.weight.dtype))
        return vision_model.encoder(inputs_embeds=emb).last_hidden_state


def ln_vision(vision_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(B, N, D) trunk output -> (B, N, D) image tokens through the trainable ln_vision, in its float32 weights' dtype.

    Autocast is off: ln_vision computes in float32 (float64 when the model is, in the equality tests).
    """
    ln = vision_model.post_layernorm
    with autocast_off(hidden.device.type):
        return ln(hidden.to(ln.weight.dtype))


def encode_image(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) float32 image tokens: frozen trunk (no grad) then trainable ln_vision in float32."""
    return ln_vision(vision_model, vision_trunk(vision_model, pixel_values))


@dataclass
class VitTraining:
    """How a trainable ViT trunk runs: recompute blocks in backward, per-block drop path rates."""

    grad_checkpointing: bool = False
    drop_path: list[float] = field(default_factory=list)  # one rate per block (empty: off)


def vit_blocks(vision_model: nn.Module) -> list[nn.Module]:
    """The trunk's transformer blocks, first to last."""
    encoder = vision_model.clip.encoder if isinstance(vision_model, ClipVisionTower) else vision_model.encoder
    return list(encoder.layers)


def unfreeze_vision(vision_model: nn.Module, grad_checkpointing: bool = False, drop_path: float = 0.0) -> None:
    """Make the whole ViT trainable in float32 (the master weights; autocast decides the compute dtype).

    `drop_path`: the last block's stochastic-depth rate, linear from 0 at the first block (per sample,
    applied to each block's whole residual update; EVA drops its attention and MLP branches separately).
    """
    vision_model.float()
    vision_model.requires_grad_(True)
    n = len(vit_blocks(vision_model))
    rates = [drop_path * i / max(1, n - 1) for i in range(n)] if drop_path > 0 else []
    vision_model.vit_training = VitTraining(grad_checkpointing, rates)


def _trainable_trunk(vision_model: nn.Module, pixel_values: torch.Tensor, training: VitTraining) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    if isinstance(vision_model, ClipVisionTower):
        vm = vision_model.clip
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        call = lambda block, x: block(x, None)  # noqa: E731 - CLIP blocks take an attention mask
    else:
        h = vision_model.embeddings(pixel_values)
        call = lambda block, x: block(x)  # noqa: E731
    for i, block in enumerate(vit_blocks(vision_model)):
        if training.grad_checkpointing and vision_model.training and torch.is_grad_enabled():
            out = checkpoint(call, block, h, use_reentrant=False)
        else:
            out = call(block, h)
        rate = training.drop_path[i] if training.drop_path and vision_model.training else 0.0
        if rate > 0:
            keep = torch.rand(h.shape[0], 1, 1, device=h.device) >= rate
            out = h + (out - h) * keep.to(h.dtype) / (1 - rate)
        h = out
    return h


def interpolate_position_embedding(pos: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(1, 1 + g*g, D) or (1 + g*g, D) -> `shape` with grid G: bicubic over the patch grid, CLS kept.

    The same resampling LAVIS's `interpolate_pos_embed` applies when the image size differs from the
    checkpoint's (align_corners=False, in float32).
    """
    squeeze = pos.dim() == 2
    p = pos[None] if squeeze else pos
    n_src, n_dst, dim = p.shape[1] - 1, shape[-2] - 1, p.shape[-1]
    g_src, g_dst = int(round(n_src ** 0.5)), int(round(n_dst ** 0.5))
    if g_src * g_src != n_src or g_dst * g_dst != n_dst or shape[-1] != dim:
        return pos  # not a square patch grid of the same width: reported as a shape mismatch
    grid = p[:, 1:].float().reshape(1, g_src, g_src, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_dst, g_dst), mode="bicubic", align_corners=False)
    out = torch.cat([p[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, n_dst, dim)], dim=1)
    return out[0] if squeeze else out


def resize_vision_input(vision_model: nn.Module, image_size: int) -> bool:
    """Make an EVA/BLIP-2 ViT take `image_size` pixels: its position embeddings resampled once (bicubic over
    the patch grid, CLS kept: LAVIS's interpolate_pos_embed), its config updated. Whether anything changed."""
    from blip2_ray.errors import UserError

    if isinstance(vision_model, ClipVisionTower):
        if vision_model.config.image_size != image_size:
            have = vision_model.config.image_size
            raise UserError(f"changing the CLIP ViT's image size ({have} -> {image_size}) at load is not supported; "
                            f"keep model.vision.image_size at {have}")
        return False
    emb = vision_model.embeddings
    if emb.image_size == image_size:
        return False
    if image_size % emb.patch_size:
        raise UserError(f"image size {image_size} is not a multiple of the ViT's patch size {emb.patch_size}")
    n = (image_size // emb.patch_size) ** 2
    pos = interpolate_position_embedding(emb.position_embedding.detach(), (1, n + 1, emb.embed_dim))
    emb.position_embedding = nn.Parameter(pos.to(emb.position_embedding.dtype),
                                          requires_grad=emb.position_embedding.requires_grad)
    emb.image_size, emb.num_patches, emb.num_positions = image_size, n, n + 1
    vision_model.config.image_size = image_size
    return True
