"""Shard readers, sample generator and per-record processing, on local files (no Ray)."""

import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest

from blip2_ray.data.config import DataConfig
from blip2_ray.data.pipeline import epoch_file_order
from blip2_ray.data.readers import read_shard_records, read_tar_records
from blip2_ray.data.records import process_records
from blip2_ray.data.sources import list_shards, storage_options
from blip2_ray.errors import UserError
from blip2_ray.fixtures.sample import CORRUPT_KINDS, make_sample_shards

ALL_WDS = {k: 1 for k in CORRUPT_KINDS}
ALL_PARQUET = {k: 1 for k in CORRUPT_KINDS if k != "truncated_tar"}


def _run(dir_, cfg=None, tokenizers=None):
    cfg = cfg or DataConfig(image_size=32)
    skips, keys = Counter(), []
    for f in list_shards(str(dir_)):
        recs = list(read_shard_records(f, cfg.image_keys, cfg.caption_keys, lambda r: skips.update([r])))
        out = process_records(recs, cfg, train=True, on_skip=lambda r: skips.update([r]), **(tokenizers or {}))
        keys.extend(out["key"])
    return keys, dict(skips)


@pytest.mark.parametrize("fmt,corrupt", [("webdataset", ALL_WDS), ("parquet", ALL_PARQUET)])
def test_exact_counts_every_corruption_kind(tmp_path, fmt, corrupt):
    summary = make_sample_shards(str(tmp_path), fmt=fmt, num=30, shards=3, corrupt=corrupt, image_size=48)
    keys, skips = _run(tmp_path)
    assert sorted(keys) == [f"{i:07d}" for i in range(30)]  # no good record lost, none duplicated
    assert skips == summary["skipped"]
    assert sum(skips.values()) == sum(corrupt.values())


def test_truncated_tar_keeps_records_before_the_break(tmp_path):
    make_sample_shards(str(tmp_path), num=10, shards=1, image_size=48)
    data = (tmp_path / "00000.tar").read_bytes()
    # cut in the middle of the 4th record's members: 3 records complete before the break
    with tarfile.open(tmp_path / "00000.tar") as t:
        members = t.getmembers()
    cut = members[9].offset_data + 10  # 3 members per record: jpg, txt, json
    for end in (cut, members[9].offset, members[9].offset + 100):  # mid-data, at a header, mid-header
        (tmp_path / "cut.tar").write_bytes(data[:end])
        skips = []
        recs = list(read_tar_records(str(tmp_path / "cut.tar"), ["jpg"], ["txt"], skips.append))
        assert [r["key"] for r in recs] == [f"{i:07d}" for i in range(3)], end
        assert skips == ["truncated_shard"]


def test_empty_files_count_as_empty_shards(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    for name in ("zero.tar",):
        skips = []
        assert list(read_tar_records(str(tmp_path / name), ["jpg"], ["txt"], skips.append)) == []
        assert skips == ["empty_shard"]


def test_missing_paths_and_columns_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no .tar or .parquet"):
        list_shards(str(tmp_path))
    make_sample_shards(str(tmp_path / "p"), fmt="parquet", num=4, shards=1)
    with pytest.raises(UserError, match=r"00000\.parquet.*no caption column.*foo"):
        list(read_shard_records(str(tmp_path / "p" / "00000.parquet"), ["jpg"], ["foo"], print))


def test_list_shards_globs_and_skips_img2dataset_metadata_parquet(tmp_path):
    make_sample_shards(str(tmp_path), num=4, shards=2)
    (tmp_path / "00000.parquet").write_bytes(b"metadata of 00000.tar")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert [os.path.basename(f) for f in list_shards(str(tmp_path))] == ["00000.tar", "00001.tar"]
    assert [os.path.basename(f) for f in list_shards(str(tmp_path / "*1.tar"))] == ["00001.tar"]


def test_sample_images_match_their_captions(tmp_path):
    make_sample_shards(str(tmp_path), num=12, shards=1, image_size=64, num_captions=2)
    with tarfile.open(tmp_path / "00000.tar") as t:
        files = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    import io

    from PIL import Image

    from blip2_ray.fixtures.sample import _RGB
    for i in range(12):
        meta = json.loads(files[f"{i:07d}.json"])
        caps = json.loads(files[f"{i:07d}.txt"])
        assert len(caps) == 2 and all(f"{meta['colour']} {meta['shape']}" in c for c in caps)
        px = np.asarray(Image.open(io.BytesIO(files[f"{i:07d}.jpg"])).convert("RGB")).reshape(-1, 3).astype(int)
        dist = np.abs(px - np.array(_RGB[meta["colour"]])).sum(1)
        assert (dist < 60).mean() > 0.05  # the shape's colour covers a good part of the image


def test_tokenised_columns(tmp_path, tiny_tokenizers):
    make_sample_shards(str(tmp_path), num=6, shards=1, image_size=48)
    cfg = DataConfig(image_size=32, qformer_max_len=16, llm_max_len=40)
    f = list_shards(str(tmp_path))[0]
    recs = list(read_shard_records(f, cfg.image_keys, cfg.caption_keys, print))
    for llm in ("opt", "t5"):
        out = process_records(recs, cfg, train=False, on_skip=print, qformer_tokenizer_path=tiny_tokenizers["qformer"],
                              llm_tokenizer_path=tiny_tokenizers[llm], llm_family=llm)
        assert out["pixel_values"].shape == (6, 3, 32, 32) and out["pixel_values"].dtype == np.uint8
        from blip2_ray.data.records import cached_llm_tokenizer, cached_qformer_tokenizer
        qt, lt = cached_qformer_tokenizer(tiny_tokenizers["qformer"]), cached_llm_tokenizer(tiny_tokenizers[llm])
        q, m = out["qformer_input_ids"], out["qformer_attention_mask"]
        assert q.shape == (6, 16) and q.dtype == np.int64 and m.dtype == np.int64
        assert (q[:, 0] == qt.cls_token_id).all()
        ids, am = out["llm_input_ids"], out["llm_attention_mask"]
        assert ids.shape == (6, 40) and ids.dtype == np.int64
        assert (am.sum(1) < 40).all()  # nothing truncated: the checks below see whole captions
        for row, mask, cap in zip(ids, am, out["caption"]):
            n = int(mask.sum())
            assert (row[n:] == lt.pad_token_id).all() and mask[:n].all()  # right padded
            text = lt.decode(row[:n], skip_special_tokens=True)
            if llm == "opt":
                assert row[0] == lt.bos_token_id and text == cap + "\n"
            else:
                assert row[n - 1] == lt.eos_token_id and text.strip() == cap


def test_epoch_file_order_shuffles_per_epoch_and_mixes_by_weight():
    a = [f"a{i}" for i in range(20)]
    b = [f"b{i}" for i in range(20)]
    e0, e1 = epoch_file_order([a, b], None, 0, 0), epoch_file_order([a, b], None, 0, 1)
    assert sorted(e0) == sorted(a + b) and e0 != e1 and e0 == epoch_file_order([a, b], None, 0, 0)
    assert epoch_file_order([a], None, 0, 0, shuffle=False) == a
    mixed = epoch_file_order([a, b], [3.0, 1.0], 0, 0)
    assert len(mixed) == 40 and 24 <= sum(f.startswith("a") for f in mixed) <= 36


def test_storage_options_from_config_and_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    o = storage_options("http://127.0.0.1:9", False)
    assert o["endpoint_url"] == "http://127.0.0.1:9" and o["key"] == "k" and o["secret"] == "s"
    o = storage_options(None, True)
    assert o.get("anon") is True and "key" not in o
