"""docs/config_reference.md is exactly what the config classes generate (so it cannot drift)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  os.path.join(ROOT, "jobs", "gen_config_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_reference_matches_the_config_classes():
    gen = load_generator()
    with open(os.path.join(ROOT, "docs", "config_reference.md")) as f:
        committed = f.read()
    assert committed == gen.render(), "docs/config_reference.md is stale: run python jobs/gen_config_reference.py"


def test_reference_has_every_leaf_key_of_every_job_config():
    from blip2_ray.config import describe

    gen = load_generator()
    text = gen.render()
    for _, _, cls in gen.sections():
        for key, *_ in describe(cls):
            assert f"| `{key}` |" in text
    assert "| `train.max_steps` | `int` | `250000` |" in text
