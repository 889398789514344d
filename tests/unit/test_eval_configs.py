"""Every shipped eval_*/capfilt_* config loads and validates (no unknown keys, right types)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2_ray.capfilt.config import CapFiltConfig
from blip2_ray.config import load_config
from blip2_ray.eval.config import EvalConfig

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("eval_*.yaml")), ids=lambda p: p.name)
def test_eval_configs_load(path):
    cfg = load_config(EvalConfig, path)
    assert cfg.model and cfg.output


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("capfilt_*.yaml")), ids=lambda p: p.name)
def test_capfilt_configs_load(path):
    cfg = load_config(CapFiltConfig, path)
    assert cfg.filter.keep >= 1 and cfg.input
