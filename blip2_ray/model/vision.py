"""Frozen image encoders: EVA ViT-g/14 (HF `Blip2VisionModel` layout) and CLIP ViT-L/14.

The trunk is frozen: half-precision weights, eval mode, no grad. Its last LayerNorm, BLIP-2's
`ln_vision`, is the exception: it trains and runs in float32. In HF's layout that LayerNorm is
`vision_model.post_layernorm`, so freezing "the ViT" must leave it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from blip2_ray.model.config import VisionConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ClipVisionTower(nn.Module):
    """CLIP ViT-L/14 without its last layer (23 of 24) plus the trainable `post_layernorm` (ln_vision)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if cfg.path:
            self.clip = CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True)
            self.clip.vision_model.encoder.layers = self.clip.vision_model.encoder.layers[: cfg.num_layers]
            self.clip.config.num_hidden_layers = cfg.num_layers
        else:
            self.clip = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                )
            )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.clip.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))
        return vm.encoder(inputs_embeds=h).last_hidden_state


def build_vision_model(cfg: VisionConfig) -> nn.Module:
    """The image encoder with random weights or weights from `cfg.path`, not yet frozen."""
    if cfg.kind == "clip_vit_l":
        return ClipVisionTower(cfg)
    from transformers import Blip2VisionConfig, Blip2VisionModel

    if cfg.path:
        from blip2_ray.model.hf_io import require_local_dir

        return Blip2VisionModel.from_pretrained(require_local_dir(cfg.path, "vision model"), local_files_only=True)
    return Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps,
            # HF's default (1e-10) makes a randomly initialised ViT map every image to the same tokens
            initializer_range=0.02,
        )
    )


def freeze_vision(vision_model: nn.Module, dtype: torch.dtype) -> None:
    """Freeze the trunk in `dtype` and eval mode; keep `post_layernorm` (ln_vision) trainable in float32."""
    for name, p in vision_model.named_parameters():
        if name.startswith("post_layernorm."):
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.data = p.data.to(dtype)
            p.requires_grad_(False)
    vision_model.eval()


def vision_trunk(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) hidden states before ln_vision, computed without grad."""
    with torch.no_grad():
        if isinstance(vision_model, ClipVisionTower):
            return vision_model.trunk(pixel_values)
        emb = vision_model.embeddings(pixel_values)
        return vision_model.encoder(inputs_embeds=emb).last_hidden_state


def ln_vision(vision_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(B, N, D) trunk output -> (B, N, D) float32 image tokens through the trainable ln_vision."""
    ln = vision_model.post_layernorm
    return ln(hidden.to(ln.weight.dtype))


def encode_image(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D) float32 image tokens: frozen trunk (no grad) then trainable ln_vision."""
    return ln_vision(vision_model, vision_trunk(vision_model, pixel_values))
