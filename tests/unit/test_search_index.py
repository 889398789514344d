"""The image index without Ray or a model: stored shards -> FAISS -> top images, against the evaluation
job's exact ITC ranking (`TopKAccumulator`); image locations read back from tar and parquet shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from blip2_ray.config import ConfigError, from_dict, load_config
from blip2_ray.errors import UserError
from blip2_ray.eval.retrieval import TopKAccumulator, itc_similarity
from blip2_ray.search import store
from blip2_ray.search.build import update_index
from blip2_ray.search.config import IndexJobConfig, IndexSection
from blip2_ray.search.index_dir import ImageIndex
from blip2_ray.search.synthetic import SyntheticCollection, exact_top_images

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "m", "path": "/m", "fingerprint": "f" * 32}


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """One FAISS thread: torch's OpenMP runtime (loaded first) spins its idle threads, and on a busy machine
    two spinning threads turned a 0.6 s IVF-PQ training into 47 s (blip2_ray/search/index.py FAISS_ENV)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _store(out: str, coll: SyntheticCollection, sizes: list[int], first_shard: int = 0) -> list[str]:
    """Shards of `coll` (consecutive images) stored as the index job stores them; their paths."""
    paths, start = [], sum(sizes[:first_shard])
    for n in sizes[first_shard:]:
        path = f"/data/{len(paths) + first_shard:05d}.tar"
        feats = coll.features(np.arange(start, start + n))
        rows = {"key": [f"k{start + i}" for i in range(n)], "caption": [f"c{start + i}" for i in range(n)],
                "offset": list(range(n)), "size": [1] * n}
        store.write_shard(out, store.shard_id(path), feats, rows, {"images": n, "model": MODEL["fingerprint"]})
        paths.append(path)
        start += n
    return paths


def _build(out, paths, coll, **index):
    return update_index(out, paths, from_dict(IndexSection, index), MODEL, {}, coll.num_queries, coll.dim)


def _exact_t2i(coll: SyntheticCollection, text: np.ndarray, k: int) -> np.ndarray:
    """The evaluation job's ITC ranking (text -> images): TopKAccumulator over the collection."""
    acc = TopKAccumulator(torch.from_numpy(text), k)
    for start, feats in coll.chunks(97):
        acc.add(np.arange(start, start + len(feats)), torch.from_numpy(feats))
    return acc.t2i()[1]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_flat_index_returns_the_evaluation_jobs_exact_itc_ranking(tmp_path):
    coll = SyntheticCollection(600, num_queries=8, dim=16, topics=20)
    _build(str(tmp_path), _store(str(tmp_path), coll, [250, 0, 350]), coll)
    index = ImageIndex(str(tmp_path))
    assert index.kind == "flat" and index.num_images == 600
    text = coll.text_queries(40)
    scores, found = index.search(text, 10)
    exact = _exact_t2i(coll, text, 10)
    assert _recall(found, exact) >= 0.99
    assert (found == exact).mean() >= 0.99  # the same order too
    # the scores are the evaluation job's itc_similarity of the stored vectors
    ref = itc_similarity(torch.from_numpy(coll.features(found[0])), torch.from_numpy(text[:1]))[:, 0].numpy()
    np.testing.assert_allclose(scores[0], ref, rtol=0, atol=1e-6)
    rows = index.rows(found[0][:2])
    assert rows[0]["key"] == f"k{found[0][0]}" and rows[0]["caption"] == f"c{found[0][0]}"
    assert rows[0]["shard"] == ("/data/00000.tar" if found[0][0] < 250 else "/data/00002.tar")


def test_image_queries_rank_by_the_best_pair_of_query_vectors(tmp_path):
    coll = SyntheticCollection(300, num_queries=8, dim=16, topics=10)
    _build(str(tmp_path), _store(str(tmp_path), coll, [300]), coll)
    queries = coll.image_queries(5)
    _, found = ImageIndex(str(tmp_path)).search(queries, 7)
    allf = torch.from_numpy(coll.features(np.arange(300)))
    for q, f in zip(queries, found):
        best = itc_similarity(allf, torch.from_numpy(q)).amax(1)  # (N,): max over both query sets
        np.testing.assert_array_equal(f, best.topk(7).indices.numpy())


def test_compressed_index_recall_and_growth(tmp_path):
    """IVF-PQ on 2,000 synthetic images of 8 x 32 floats, 2 floats per PQ sub-quantizer (at BLIP-2's 256
    floats the default is 8; docs/search.md): recall@10 against the exact ranking measured 1.0 with the
    exact re-scoring of its best 16k (the default refine_factor; 0.98-0.99 with 4k), 0.60-0.64 on PQ scores
    alone (3 seeds of the collection)."""
    coll = SyntheticCollection(2000, num_queries=8, dim=32, topics=30)
    out = str(tmp_path)
    paths = _store(out, coll, [1200, 400, 400])
    m1 = _build(out, paths[:2], coll, kind="ivfpq", pq_m=16, train_vectors=4096)
    assert m1["kind"] == "ivfpq" and m1["factory"].startswith("IVF") and m1["num_images"] == 1600
    m2 = _build(out, paths, coll, kind="ivfpq", pq_m=16, train_vectors=4096)  # grows: lists and codebooks kept
    assert m2["version"] == 2 and m2["params"]["nlist"] == m1["params"]["nlist"] and m2["num_images"] == 2000
    assert not os.path.exists(os.path.join(out, m1["index_file"]))  # the old version is gone
    text = coll.text_queries(60)
    exact = exact_top_images(coll, text, 10, chunk=500)
    index = ImageIndex(out)
    refined = _recall(index.search(text, 10)[1], exact)
    index.refine = 0
    pq_only = _recall(index.search(text, 10)[1], exact)
    assert refined >= 0.9 and pq_only < refined


def test_growing_a_flat_index_equals_building_it_at_once(tmp_path):
    coll = SyntheticCollection(500, num_queries=4, dim=16, topics=10)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    paths = _store(a, coll, [200, 300])
    _build(a, paths[:1], coll)
    grown = _build(a, paths, coll)
    _build(b, _store(b, coll, [200, 300]), coll)
    text = coll.text_queries(10)
    ga, gb = ImageIndex(a), ImageIndex(b, mmap=False)
    np.testing.assert_array_equal(ga.search(text, 10)[1], gb.search(text, 10)[1])
    assert grown["version"] == 2 and [s["first"] for s in grown["shards"]] == [0, 200]


def test_auto_switches_to_ivfpq_past_exact_max_images_by_rebuilding(tmp_path):
    coll = SyntheticCollection(600, num_queries=4, dim=16, topics=10)
    paths = _store(str(tmp_path), coll, [200, 400])
    assert _build(str(tmp_path), paths[:1], coll, exact_max_images=300)["kind"] == "flat"
    assert _build(str(tmp_path), paths, coll, exact_max_images=300, train_vectors=1024)["kind"] == "ivfpq"


def test_a_model_other_than_the_indexs_is_an_error_naming_both(tmp_path):
    for name, weights in (("model-a", b"\x01"), ("model-b", b"\x02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(weights * 100)
    a, b = store.model_identity(str(tmp_path / "model-a")), store.model_identity(str(tmp_path / "model-b"))
    store.same_model_or_error(a, store.model_identity(str(tmp_path / "model-a")), "idx")
    with pytest.raises(UserError, match=r"built with model 'model-a'.*the model here is 'model-b'"):
        store.same_model_or_error(a, b, "idx")
    with pytest.raises(UserError, match="holds no image index"):
        store.require_manifest(str(tmp_path))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_each_records_image_reads_back_from_its_location(tmp_path, fmt):
    from blip2_ray.data.readers import read_images_at, read_shard_records
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path), fmt=fmt, num=12, shards=2, image_size=40, corrupt={"undecodable_image": 1})
    for path in list_shards(str(tmp_path)):
        recs = list(read_shard_records(path, ["jpg", "image"], ["txt", "caption"], print))
        got = read_images_at(path, [r["image_at"] for r in reversed(recs)], ["jpg", "image"])
        assert got == [r["image"] for r in reversed(recs)]
    assert read_images_at(str(tmp_path / "gone.tar"), [(0, 10)], ["jpg"]) == [None]


def test_index_configs_load_and_unknown_keys_are_errors():
    for name in ("index_tiny.yaml", "index_vitg.yaml"):
        cfg = load_config(IndexJobConfig, ROOT / "jobs" / "configs" / name)
        assert cfg.model and cfg.output_dir
    with pytest.raises(ConfigError, match="nlist"):
        load_config(IndexJobConfig, None, ["input=[x]", "output_dir=o", "model=m", "index.nlists=4"])
    with pytest.raises(ConfigError, match="keep_features"):
        load_config(IndexJobConfig, None, ["input=[x]", "output_dir=o", "model=m", "index.keep_features=false"])
