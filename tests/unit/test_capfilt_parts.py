"""CapFilt pieces without Ray or models: config checks, ranking, atomic shard writes, wrong captions."""

from __future__ import annotations

import json
import os

import pytest
import torch

from blip2_ray.capfilt import shards as S
from blip2_ray.capfilt.config import CapFiltConfig
from blip2_ray.capfilt.filters import rank_captions
from blip2_ray.config import ConfigError, from_dict
from blip2_ray.runtime.files import temporary_path


def test_config_validation():
    ok = {"input": ["x/"], "output_dir": "o", "filter": {"model": "f"}, "captioner": {"model": "c"}}
    cfg = from_dict(CapFiltConfig, ok)
    assert cfg.captioner.num_captions == 10 and cfg.filter.keep == 2 and cfg.captioner.top_p == 0.9
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        from_dict(CapFiltConfig, {**ok, "filter": {"model": "f", "keep": 0}})
    with pytest.raises(ConfigError, match="captioner.model"):
        from_dict(CapFiltConfig, {**ok, "captioner": {}})
    assert from_dict(CapFiltConfig, {**ok, "captioner": {"num_captions": 0}}).captioner.model == ""
    with pytest.raises(ConfigError, match="unknown config key 'filter.kep'"):
        from_dict(CapFiltConfig, {**ok, "filter": {"model": "f", "kep": 1}})


def test_rank_captions_is_max_over_queries():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (Q=2, E=2)
    t = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [1.0, 0.0]])
    assert rank_captions(q, t).tolist() == pytest.approx([0.8, 0.0, 1.0])


def test_shard_writes_are_atomic_and_invisible_until_done(tmp_path):
    from blip2_ray.data.sources import list_shards

    final = str(tmp_path / "00000.tar")
    S.write_tar(final, [("k1", {"jpg": b"x", "txt": json.dumps(["a", "b"]).encode()})])
    assert os.listdir(tmp_path) == ["00000.tar"]
    # a temporary name is hidden and has no shard suffix: no reader lists a half-written file
    tmp = temporary_path(final)
    open(tmp, "wb").close()
    assert list_shards(str(tmp_path)) == [final]
    got = list(S.read_tar_members(final, print))
    assert got == [("k1", {"jpg": b"x", "txt": b'["a", "b"]'})]
    # the next run's plan removes temporaries left by an interrupted one
    from blip2_ray.capfilt.job import plan
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), num=2, shards=2, image_size=32)
    cfg = from_dict(CapFiltConfig, {"input": [str(tmp_path / "in")], "output_dir": str(tmp_path / "out"),
                                    "filter": {"model": "f"}, "captioner": {"num_captions": 0}})
    os.makedirs(tmp_path / "out")
    stale = temporary_path(str(tmp_path / "out" / "00001.tar"))
    open(stale, "wb").close()
    open(tmp_path / "out" / "00000.tar", "wb").close()  # done
    files, todo = plan(cfg)
    assert len(files) == 2 and [os.path.basename(f) for f in todo] == ["00001.tar"] and not os.path.exists(stale)


def test_swapped_captions_are_wrong(tmp_path):
    from blip2_ray.fixtures.capfilt_measure import swap_web_captions
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), num=12, shards=2, image_size=32)
    assert swap_web_captions(str(tmp_path / "in"), str(tmp_path / "out")) == 12
    for p in sorted(os.listdir(tmp_path / "out")):
        for _, m in S.read_tar_members(str(tmp_path / "out" / p), print):
            meta, words = json.loads(m["json"]), m["txt"].decode().split()
            assert meta["colour"] not in words and meta["shape"] not in words
