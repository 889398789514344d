"""The typed config system: YAML overrides, --set, unknown keys, types, presets."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blip2_ray.config import ConfigError, describe, from_dict, load_config, parse_set, to_dict
from blip2_ray.config_fields import doc
from blip2_ray.model.config import ModelConfig, model_config


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-4
    sources: list[str] = field(default_factory=list)

    def validate(self):
        if self.steps <= 0:
            raise ValueError("steps must be positive")


@dataclass
class Job:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_yaml_then_set_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: mine\ninner:\n  steps: 5\n  lr: 3e-4\n")
    cfg = load_config(Job, f, ["inner.steps=7", "inner.sources=[a/, b/]", "flag=true"])
    assert cfg.name == "mine" and cfg.inner.steps == 7 and cfg.inner.lr == pytest.approx(3e-4)
    assert cfg.inner.sources == ["a/", "b/"] and cfg.flag is True
    assert from_dict(Job, to_dict(cfg)) == cfg


def test_unknown_key_names_the_valid_ones(tmp_path):
    valid = r"unknown config key 'inner.step'.*valid keys at 'inner': lr, sources, steps"
    with pytest.raises(ConfigError, match=valid):
        load_config(Job, None, ["inner.step=3"])
    with pytest.raises(ConfigError, match="valid keys at the top level: flag, inner, name"):
        from_dict(Job, {"nme": "x"})


def test_wrong_types_and_validation_are_clear():
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        from_dict(Job, {"inner": {"steps": "many"}})
    with pytest.raises(ConfigError, match="flag: expected true or false"):
        from_dict(Job, {"flag": "yes please"})
    with pytest.raises(ConfigError, match="inner: steps must be positive"):
        from_dict(Job, {"inner": {"steps": 0}})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set("inner.steps")


@dataclass
class Bounded:
    width: int = doc("a size", 8, ge=1)
    rate: float = doc("a fraction", 0.5, gt=0, le=1)
    cap: int | None = doc("optional", None, ge=1)


@dataclass
class BoundedDefaults(Bounded):
    width: int = doc("a size, another default", 16)  # a subclass changing a default keeps the base's bounds


@dataclass
class BoundedList:
    items: list[Bounded] = field(default_factory=list)


@pytest.mark.parametrize("data, message", [
    ({"width": 0}, r"^config: width must be >= 1, got 0$"),
    ({"rate": 0.0}, r"^config: rate must be in \(0, 1\], got 0.0$"),
    ({"rate": 1.5}, r"^config: rate must be in \(0, 1\], got 1.5$"),
    ({"cap": 0}, r"^config: cap must be >= 1 or null, got 0$"),
])
def test_field_bounds_are_checked_with_one_sentence(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Bounded, data)


def test_field_bounds_pass_inside_and_reach_subclasses_and_list_items():
    cfg = from_dict(Bounded, {"width": 1, "rate": 1, "cap": None})
    assert (cfg.width, cfg.rate, cfg.cap) == (1, 1.0, None)
    with pytest.raises(ConfigError, match="width must be >= 1, got 0"):
        from_dict(BoundedDefaults, {"width": 0})
    with pytest.raises(ConfigError, match=r"^items\[1\]: rate must be in \(0, 1\], got 2.0$"):
        from_dict(BoundedList, {"items": [{}, {"rate": 2}]})
    rows = {key: text for key, _, _, text in describe(BoundedDefaults)}
    assert rows == {"width": "a size, another default (must be >= 1)", "rate": "a fraction (must be in (0, 1])",
                    "cap": "optional (must be >= 1)"}


def test_a_zero_size_is_refused_before_any_arithmetic_on_it():
    # num_heads=0 used to reach `hidden_size % num_heads` and end in a ZeroDivisionError traceback
    with pytest.raises(ConfigError, match=r"^qformer: num_heads must be >= 1, got 0$"):
        from_dict(ModelConfig, {"qformer": {"num_heads": 0}})


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, bad)


def test_presets_sit_beneath_explicit_keys():
    cfg = model_config("vitg_opt2.7b", llm={"dtype": "bfloat16"})
    assert cfg.vision.num_layers == 39 and cfg.vision.hidden_size == 1408
    assert cfg.llm.hidden_size == 2560 and cfg.llm.dtype == "bfloat16"
    assert model_config("vitl_flant5xl").vision.num_layers == 23
    assert model_config().vision.hidden_size == 32  # tiny by default
    with pytest.raises(ConfigError, match="valid presets"):
        model_config("vit-huge")
    with pytest.raises(ConfigError, match="not a multiple"):
        model_config("tiny", vision={"patch_size": 7})


def test_describe_lists_every_leaf_key():
    keys = [row[0] for row in describe(ModelConfig)]
    assert "vision.num_layers" in keys and "llm.prompt" in keys and "qformer.num_query_tokens" in keys


def test_set_changes_one_item_of_a_list_the_config_holds(tmp_path):
    from blip2_ray.train.finetune_config import FinetuneConfig

    shipped = Path(__file__).resolve().parents[2] / "jobs/configs/finetune_instruct_tiny.yaml"
    names = [s.name for s in load_config(FinetuneConfig, shipped).instruct.sources]
    cfg = load_config(FinetuneConfig, shipped, ["instruct.sources[1].train=/x/b.json",
                                                "instruct.sources[5].eval_image_root=/x/test", "train.max_steps=3"])
    assert cfg.instruct.sources[1].train == "/x/b.json" and cfg.instruct.sources[1].name == names[1]
    assert cfg.instruct.sources[5].eval_image_root == "/x/test" and cfg.train.max_steps == 3
    assert cfg.instruct.sources[0].train.endswith(f"{names[0]}_train.json")  # the others untouched
    with pytest.raises(ConfigError, match=r"instruct.sources holds 6 item\(s\) in the config, so index 6"):
        load_config(FinetuneConfig, shipped, ["instruct.sources[6].train=/x"])
    with pytest.raises(ConfigError, match="unknown config key 'instruct.sources\\[1\\].trian'|trian"):
        load_config(FinetuneConfig, shipped, ["instruct.sources[1].trian=/x"])
    with pytest.raises(ConfigError, match="holds no list at inner.sources"):
        load_config(Job, None, ["inner.sources[0]=a"])
    with pytest.raises(ConfigError, match="dotted names"):
        load_config(Job, None, ["inner.sources[x]=a"])
