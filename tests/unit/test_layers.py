"""The package's layers (tools/check_import_cycles.py LAYER_RULES): the network (model/) reads no weights, and no
library module imports the fixtures (fixtures/: tiny backbones, generated data sets) that demo and tests use."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_the_package_keeps_its_layers(checker):
    edges = checker.import_edges(checker.module_names(str(ROOT / "blip2_ray")))
    assert any(e.source.startswith("blip2_ray.weights.") and e.target.startswith("blip2_ray.model.") for e in edges)
    assert checker.layer_violations(edges) == []


def test_a_crossing_import_is_named_with_its_reason(checker):
    def edge(source: str, target: str):
        return checker.Edge(source, target, "x.py", 1)

    crossing = [edge("blip2_ray.model.stage1", "blip2_ray.weights.convert"),
                edge("blip2_ray.train.loop", "blip2_ray.fixtures.sample")]
    allowed = [edge("blip2_ray.weights.vision", "blip2_ray.model.vision"),
               edge("blip2_ray.cli", "blip2_ray.fixtures.sample"),
               edge("blip2_ray.fixtures.sample_vqa", "blip2_ray.fixtures.sample"),
               edge("blip2_ray.modelling", "blip2_ray.weights.convert")]  # a prefix is a whole package name
    found = checker.layer_violations(crossing + allowed)
    assert [e for e, _ in found] == crossing
    assert "weights/ depends on model/" in found[0][1] and "never the library" in found[1][1]
