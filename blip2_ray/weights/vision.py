"""The frozen image encoder's weights: `build_vision_model` constructs the ViT of model/vision.py and assigns the
trunk (and ln_vision when the source has it) from its weight source (weights/weight_sources.py: a BLIP-2 or
Blip2VisionModel directory, a CLIP directory, LAVIS's eva_vit_g.pth), through the layout's rename table.
"""

from __future__ import annotations

import re

from torch import nn

from blip2_ray.model.config import VisionConfig
from blip2_ray.model.partitioned import FrozenConstruction
from blip2_ray.model.vision import construct_vision_model
from blip2_ray.weights import convert
from blip2_ray.weights.checkpoint_files import assign_weights, require_materialized
from blip2_ray.weights.weight_sources import WeightSource


def build_vision_model(cfg: VisionConfig, source: WeightSource | None = None,
                       construction: FrozenConstruction | None = None) -> nn.Module:
    """The image encoder, not yet frozen: trunk in `cfg.dtype`, ln_vision (post_layernorm) in float32.

    `source`: the weights (see weight_sources.vision_source); None: random init (seeded by the caller).
    Peak memory is the trunk in its dtype plus one tensor being converted. `construction` (ZeRO-3,
    model/partitioned.py): built partitioned, each rank reading only its slices; peak about 1/world of it.
    """
    model = construct_vision_model(cfg, construction, weights_follow=source is not None)
    if source is not None:
        load_vision_weights(model, cfg, source)
    return model


def load_vision_weights(model: nn.Module, cfg: VisionConfig, source: WeightSource) -> None:
    """Assign the trunk (and ln_vision when the source has it) from `source` into a meta-built (or
    partitioned) `model`."""
    files = source.files()
    layout = source.layout
    prefix = "vision_model." if layout is convert.LAVIS_BLIP2 else ""
    keys = [k for k in files.keys() if not prefix or k.startswith(("visual_encoder.", "ln_vision."))]
    plan = convert.plan_conversion(layout, keys, source.label, depth=cfg.num_layers)
    own = {prefix + k: v for k, v in model.state_dict(keep_vars=True).items()}
    state = convert.convert_tensors(plan, files, own).renamed(lambda k: k.removeprefix(prefix))
    provides = layout.provides if not prefix else convert.VIT_PROVIDES
    required = [k for k in model.state_dict(keep_vars=True) if re.search(provides, k)]
    assign_weights(model, state, source.label, required=required)
    ln = model.post_layernorm
    if ln.weight.device.type == "meta":  # the source has no ln_vision: LayerNorm's own init (LAVIS's too)
        ln.to_empty(device="cpu")
        ln.reset_parameters()
    require_materialized(model, source.label)
