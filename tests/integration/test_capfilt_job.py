"""CapFilt job mechanics with random tiny models: counts, output format, resumability, corrupt inputs.

Random models write random captions and rank at random, so these tests check mechanics only; the
quality measure (correct caption kept over a wrong web caption) needs trained models:
`python jobs/capfilt.py measure --filter STAGE1_EXPORT --data SHAPES_SHARDS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_models(tiny_exports):
    return {"captioner": tiny_exports["stage2"], "filter": tiny_exports["stage1"]}


def _cfg(inp, out, models, **over):
    from blip2_ray.capfilt.config import CapFiltConfig
    from blip2_ray.config import from_dict

    data = {"input": [str(inp)], "output_dir": str(out),
            "captioner": {"model": models["captioner"], "num_captions": 3, "max_new_tokens": 6, "min_new_tokens": 2},
            "filter": {"model": models["filter"], "keep": 2},
            "compute": {"num_actors": 2, "batch_size": 8, "num_cpus_per_actor": 0.5},
            "data": {"image_size": 32}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(CapFiltConfig, data)


def test_capfilt_webdataset_counts_format_and_resume(ray_session, tiny_models, tmp_path):
    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.records import process_records
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards

    info = make_sample_shards(str(tmp_path / "in"), "webdataset", num=24, shards=3, image_size=32, seed=1,
                              corrupt={"undecodable_image": 1, "missing_caption": 1, "truncated_tar": 1})
    out = tmp_path / "out"
    cfg = _cfg(tmp_path / "in", out, tiny_models)
    s = run_capfilt(cfg)
    assert s["shards"] == 3 and s["shards_done_now"] == 3
    assert s["images"] == info["good"] == 24
    assert s["skipped"] == {"undecodable_image": 1, "missing_caption": 1, "truncated_shard": 1}
    assert 0 < s["captions_generated"] <= 24 * 3
    assert s["captions_kept"] == 24 * 2  # keep 2 of (1 web + up to 3 synthetic)
    assert 0.0 <= s["share_of_kept_that_are_web"] <= 1.0
    assert sorted(os.path.basename(p) for p in list_shards(str(out))) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # every output record keeps its members, holds 2 captions + their scores, and trains as is
    dc = DataConfig(image_size=32)
    recs = [r for p in list_shards(str(out)) for r in read_shard_records(p, dc.image_keys, dc.caption_keys, print)]
    assert len(recs) == 24
    caps = json.loads(recs[0]["caption"])
    assert isinstance(caps, list) and len(caps) == 2
    skips = []
    batch = process_records(recs, dc, train=True, on_skip=skips.append)
    assert len(batch["key"]) == 24 and not skips
    import tarfile

    with tarfile.open(list_shards(str(out))[0]) as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert {f"{key}.jpg", f"{key}.txt", f"{key}.json", f"{key}.capfilt.json"} <= set(names)
    meta = json.loads(tar_member(list_shards(str(out))[0], f"{key}.capfilt.json"))
    assert len(meta["scores"]) == 2 and meta["scores"][0] >= meta["scores"][1] and len(meta["synthetic"]) == 2

    # resume: a finished shard is skipped, a missing one redone; totals unchanged
    mtime = os.path.getmtime(out / "00000.tar")
    os.remove(out / "00001.tar")
    s2 = run_capfilt(cfg)
    assert s2["shards_done_now"] == 1 and s2["shards_done_before"] == 2
    assert os.path.getmtime(out / "00000.tar") == mtime
    assert s2["images"] == 24 and s2["captions_kept"] == 48
    s3 = run_capfilt(cfg)
    assert s3["shards_done_now"] == 0 and s3["images"] == 24


def tar_member(path: str, name: str) -> bytes:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


def test_capfilt_parquet_and_filter_only(ray_session, tiny_models, tmp_path):
    import pyarrow.parquet as pq

    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), "parquet", num=10, shards=2, image_size=32, seed=2, num_captions=2)
    cfg = _cfg(tmp_path / "in", tmp_path / "out", tiny_models, captioner={"num_captions": 0}, filter={"keep": 1},
               compute={"num_actors": 1})
    s = run_capfilt(cfg)
    assert s["images"] == 10 and s["captions_generated"] == 0 and s["captions_kept"] == 10
    assert s["share_of_kept_that_are_web"] == 1.0
    t = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert {"key", "jpg", "caption", "json", "capfilt"} <= set(t.column_names)
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["caption"]) == 1 and json.loads(row["capfilt"])["synthetic"] == [False]
    assert len(json.loads(row["capfilt"])["web"]) == 2  # both web phrasings were candidates


def test_capfilt_paper_pair_blip_clip(ray_session, tiny_blip_clip, tiny_models, tmp_path):
    """BLIP-large + CLIP ViT-L/14's layouts (tiny, random) in the same actor pool: counts, provenance in every
    record and in the summary, CLIP's 77-token limit counted, resume, and no mixing with another pair."""
    from blip2_ray.capfilt import shards as S
    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.records import process_records
    from blip2_ray.data.sources import list_shards
    from blip2_ray.errors import UserError
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), "webdataset", num=12, shards=3, image_size=32, seed=3)
    first = sorted(list_shards(str(tmp_path / "in")))[0]
    recs = list(S.read_tar_members(first, print))
    recs[0][1]["txt"] = " ".join(["zebras"] * 60).encode()  # 50 words after cleaning, > 77 CLIP tokens
    S.write_tar(first, recs)
    out = tmp_path / "out"
    paper = {"captioner": {"kind": "blip", "model": tiny_blip_clip["blip"], "prompt": "a picture of",
                           "prepend_prompt": False, "repetition_penalty": 1.1},
             "filter": {"kind": "clip", "model": tiny_blip_clip["clip"]}}
    cfg = _cfg(tmp_path / "in", out, tiny_models, **paper, compute={"num_actors": 1})  # two actors: the webdataset test
    s = run_capfilt(cfg)
    models = {"captioner": {"kind": "blip", "model": "blip-image-captioning-large"},
              "filter": {"kind": "clip", "model": "clip-vit-large-patch14"}}
    assert s["images"] == 12 and s["shards_done_now"] == 3 and s["captions_kept"] == 24
    assert 0 < s["captions_generated"] <= 12 * 3
    assert s["captions_truncated"] == 1 and s["models"] == models
    dc = DataConfig(image_size=32)
    for path in list_shards(str(out)):
        for _, m in S.read_tar_members(path, print):
            meta = json.loads(m["capfilt.json"])
            assert {k: meta[k] for k in ("captioner", "filter")} == models
            assert len(meta["captions"]) == 2 and meta["scores"][0] >= meta["scores"][1]
            assert json.loads(m["txt"]) == meta["captions"]
        assert json.loads((out / (os.path.basename(path) + ".capfilt.json")).read_text())["models"] == models
    recs = [r for p in list_shards(str(out)) for r in read_shard_records(p, dc.image_keys, dc.caption_keys, print)]
    skips = []
    assert len(process_records(recs, dc, train=True, on_skip=skips.append)["key"]) == 12 and not skips

    os.remove(out / "00002.tar")
    s2 = run_capfilt(cfg)
    assert (s2["shards_done_now"], s2["images"], s2["captions_truncated"]) == (1, 12, 1)
    os.remove(out / "00002.tar")
    with pytest.raises(UserError, match="already holds 0000[01].tar written by .*blip.*use a new output_dir"):
        run_capfilt(_cfg(tmp_path / "in", out, tiny_models))  # the BLIP-2 pair into the paper pair's output


def test_wrong_caption_measures_run(ray_session, tiny_models, tmp_path, job_main, capsys):
    """The quality measures run end to end (random models: the rates are only checked to be rates)."""
    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.fixtures.capfilt_measure import kept_correct_rate, swap_web_captions
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "clean"), "webdataset", num=8, shards=1, image_size=32, seed=5)
    swap_web_captions(str(tmp_path / "clean"), str(tmp_path / "wrong"))
    run_capfilt(_cfg(tmp_path / "wrong", tmp_path / "out", tiny_models, compute={"num_actors": 1}))
    rate = kept_correct_rate(str(tmp_path / "out"))
    assert rate["images"] == 8 and 0 <= rate["top_kept_correct_rate"] <= 1

    capsys.readouterr()
    assert job_main("capfilt")(["measure", "--filter", tiny_models["filter"], "--data", str(tmp_path / "clean"),
                                "--limit", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 8 and 0 <= out["correct_kept_rate"] <= 1


def test_capfilt_cli_on_the_shared_cluster(ray_session, tiny_models, tmp_path, job_main, capsys):
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), "webdataset", num=6, shards=2, image_size=32, seed=6)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: [{tmp_path / 'in'}]\noutput_dir: {tmp_path / 'out'}\n"
                   f"captioner: {{model: {tiny_models['captioner']}, num_captions: 2, max_new_tokens: 4, "
                   f"min_new_tokens: 1}}\n"
                   f"filter: {{model: {tiny_models['filter']}}}\ncompute: {{num_actors: 1, num_cpus_per_actor: 0.5}}\n"
                   f"data: {{image_size: 32}}\n")
    capsys.readouterr()
    assert job_main("capfilt")(["--config", str(cfg), "--address", ray_session, "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["images"] == 6 and s["captions_kept"] == 12 and s["shards"] == 2
    assert (tmp_path / "out" / "capfilt_summary.json").exists()
