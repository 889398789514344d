"""The fixtures' backbone pre-training (fixtures/backbones.py, fixtures/tiny_instruct.py) steps AdamW over all
parameters at once (FOREACH): the learning tests' thresholds were measured with torch's per-parameter CPU path, so
the two must give the same weights bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from blip2_ray.fixtures import backbones


@pytest.mark.parametrize("which", ["llm", "vit"])
def test_multi_tensor_adamw_gives_the_per_parameter_weights(which, tmp_path, tiny_tokenizers, monkeypatch):
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_config("tiny")

    def build(foreach: bool, steps: int = 12) -> dict:
        monkeypatch.setattr(backbones, "FOREACH", foreach)
        out = str(tmp_path / f"{which}_{foreach}_{steps}")
        if which == "llm":
            caps = ["a red square", "two blue circles", "a green triangle on the left"]
            backbones.pretrain_tiny_llm(cfg, llm_tokenizer(cfg), caps, out, attribute_words=["red", "blue", "green"],
                                        steps=steps, batch_size=8, lr=1e-2, report_every_s=0)
        else:
            g = torch.Generator().manual_seed(0)
            pixels = torch.randn(16, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
            labels = [torch.randint(0, 3, (16,), generator=g)]
            backbones.pretrain_tiny_vision(cfg, pixels, labels, out, steps=steps, batch_size=8, lr=1e-2,
                                           report_every_s=0)
        return load_file(f"{out}/model.safetensors")

    assert backbones.FOREACH is True
    per_parameter, multi_tensor = build(False), build(True)
    assert per_parameter.keys() == multi_tensor.keys()
    assert all(torch.equal(per_parameter[k], multi_tensor[k]) for k in per_parameter)
    # the steps moved the weights (two untrained models would compare equal whatever the optimizer)
    untrained = build(True, steps=0)
    assert any(not torch.equal(untrained[k], multi_tensor[k]) for k in multi_tensor)
