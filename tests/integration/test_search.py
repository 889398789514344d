"""Search end to end: the index job over a generated collection (tars, an unreadable shard, then a new
shard on S3 to grow it), then /v1/search through the real app, against the evaluation job's own code:
the ITC ranking of `TopKAccumulator` and the ITM + ITC re-ranking of `rerank`, on the same images."""

from __future__ import annotations

import base64
import os
import shutil

import numpy as np
import pytest

from blip2_ray.runtime.cluster import free_port

QUERY = "a picture of a red circle"
K, CANDIDATES = 10, 16


def _index_cfg(inputs, out, model, s3_endpoint):
    from blip2_ray.config import from_dict
    from blip2_ray.search.config import IndexJobConfig

    return from_dict(IndexJobConfig, {
        "input": inputs, "output_dir": str(out), "model": model,
        "compute": {"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 8, "dtype": "float32"},
        "data": {"s3_endpoint_url": s3_endpoint}})


def _reference(model: str, images: list[tuple[str, bytes]], query: str, k: int) -> tuple[list, list]:
    """(exact ITC top k, re-ranked top k) as [(key, score)], computed by the evaluation job's actor class
    (in this process), TopKAccumulator and rerank on the same images and query."""
    import torch

    from blip2_ray.config import to_dict
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.processor import tokenize_qformer
    from blip2_ray.data.records import cached_qformer_tokenizer
    from blip2_ray.eval.actors import Stage1Actor
    from blip2_ray.eval.retrieval import TopKAccumulator, rerank

    data = to_dict(DataConfig())
    rows = {"idx": np.arange(len(images)), "path": np.array([""] * len(images), dtype=object),
            "image": [b for _, b in images]}
    feats = Stage1Actor(model, "image", "float32", data)(rows)
    text = Stage1Actor(model, "text", "float32", data)({"tidx": np.array([0]), "text": np.array([query])})
    acc = TopKAccumulator(torch.from_numpy(text["text_feat"]), k)
    acc.add(feats["idx"], torch.from_numpy(feats["image_feats"]))
    vals, idx = acc.t2i()
    enc = tokenize_qformer(cached_qformer_tokenizer(os.path.abspath(model)), [query], 32)
    itm_actor = Stage1Actor(model, "itm", "float32", data, pairs={int(i): np.array([0]) for i in idx[0]},
                            text_ids=enc["qformer_input_ids"], text_mask=enc["qformer_attention_mask"])
    out = itm_actor({k_: (v[idx[0]] if k_ == "idx" else [v[i] for i in idx[0]]) for k_, v in rows.items()})
    itm = {(int(i), int(t)): float(v) for i, t, v in zip(out["idx"], out["tidx"], out["itm"])}
    _, ranked = rerank({}, vals, idx, itm)
    itc_of = dict(zip(idx[0].tolist(), vals[0].tolist()))
    exact = [(images[i][0], itc_of[i]) for i in idx[0]]
    reranked = [(images[i][0], itm[(int(i), 0)] + itc_of[int(i)]) for i in ranked[0]]
    return exact, reranked


def _decodes(raw: bytes) -> bool:
    from blip2_ray.data.transforms import SkipRecord, decode_image

    try:
        decode_image(raw, 32, 89_478_485)
        return True
    except SkipRecord:
        return False


def _same_ranking(got: list, want: list, tol: float = 1e-5) -> None:
    """Equal rankings of (key, score); two keys may trade places only where their scores tie."""
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=tol)
    for (gk, gs), (wk, _) in zip(got, want):
        if gk != wk:
            assert any(k == gk and abs(s - gs) <= tol for k, s in want), (got, want)


def test_index_job_then_search_through_the_app(ray_session, tiny_exports, s3_server, tmp_path):
    import httpx
    from ray import serve

    from blip2_ray.config import from_dict
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.sources import list_shards
    from blip2_ray.errors import UserError
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.search.job import run_index
    from blip2_ray.serve.app import build_app
    from blip2_ray.serve.config import ServeConfig

    stage1 = tiny_exports["stage1"]
    local, new = tmp_path / "local", tmp_path / "new"
    make_sample_shards(str(local), num=24, shards=2, image_size=48, seed=3, corrupt={"undecodable_image": 1})
    (local / "unreadable.tar").write_bytes(b"not a tar" * 200)
    make_sample_shards(str(new), num=8, shards=1, image_size=48, seed=4)
    bucket = s3_server["bucket"]
    s3_server["client"].upload_file(str(new / "00000.tar"), bucket, "search/00000.tar")
    s3_shard = f"s3://{bucket}/search/00000.tar"
    out = tmp_path / "index"

    # the job: 2 shards + 1 unreadable, then rerun with a new shard on S3 (only that one is computed)
    s = run_index(_index_cfg([str(local)], out, stage1, s3_server["endpoint_url"]))
    assert (s["images"], s["shards_done_now"], s["shards_unreadable"]) == (24, 3, 1)
    assert s["skipped"] == {"undecodable_image": 1, "truncated_shard": 1} and s["kind"] == "flat"
    s = run_index(_index_cfg([str(local), s3_shard], out, stage1, s3_server["endpoint_url"]))
    assert (s["images"], s["shards_done_now"], s["shards_done_before"], s["shards_in_index"]) == (32, 1, 3, 4)

    images = [(r["key"] + "@" + os.path.basename(p), r["image"])
              for p in list_shards(str(local)) + [str(new / "00000.tar")]
              for r in read_shard_records(p, ["jpg"], ["txt"], lambda reason: None)]
    decodable = [im for im in images if _decodes(im[1])]
    assert len(decodable) == 32
    exact, reranked = _reference(stage1, decodable, QUERY, CANDIDATES)

    # deploying with another model than the index's is refused, naming both
    other = tmp_path / "other-stage1"
    shutil.copytree(stage1, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"built with model 'stage1'.*model here is 'other-stage1'"):
        build_app(from_dict(ServeConfig, {"retrieval_model": str(other), "search": {"index": str(out)}}))

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = from_dict(ServeConfig, {
        "retrieval_model": stage1, "ingress": {"cpus_per_replica": 0.25}, "retrieval": {"cpus_per_replica": 0.25},
        "search": {"index": str(out), "name": "shapes", "max_k": 20, "rerank_candidates": CANDIDATES,
                   "cpus_per_replica": 0.5}})
    serve.run(build_app(cfg, name_prefix="Search"), name="search", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
            assert "shapes" in ids

            def named(rows):  # "key@shard file", as the reference names images
                return [(r["key"] + "@" + os.path.basename(r["shard"]), r["score"]) for r in rows]

            r = c.post("/v1/search", json={"text": QUERY, "k": K, "rerank": False})
            assert r.status_code == 200, r.text
            _same_ranking(named(r.json()["data"]), exact[:K])  # the index's top 10 == the exact ITC ranking

            r = c.post("/v1/search", json={"text": QUERY, "k": K})
            body = r.json()
            assert body["reranked"] and body["candidates"] == CANDIDATES and body["unreadable_candidates"] == 0
            assert body["model"] == "shapes" and not body["query"]["truncated"]
            _same_ranking(named(body["data"]), reranked[:K])  # == the evaluation job's re-ranking

            # image -> images: an indexed image finds itself first (the best pair of its own vectors: 1.0)
            key, raw = decodable[5]
            r = c.post("/v1/search", json={"image": base64.b64encode(raw).decode(), "k": 3})
            top = r.json()["data"][0]
            assert top["key"] + "@" + os.path.basename(top["shard"]) == key and top["score"] > 0.999

            # the bad input
            long = c.post("/v1/search", json={"text": " ".join(["red circle"] * 40), "k": 2}).json()
            assert long["query"]["truncated"] and long["query"]["tokens"] > 32 and "ignored" in long["query"]["note"]
            both = {"text": QUERY, "image": base64.b64encode(raw).decode()}
            for bad in ({"text": "   "}, {"text": ""}, {"text": QUERY, "k": 0}, {"text": QUERY, "k": 21},
                        {"text": QUERY, "candidates": 10_000}, {}, both, {"text": QUERY, "top": 3}):
                r = c.post("/v1/search", json=bad)
                assert r.status_code == 422 and r.json()["error"]["message"], (bad, r.text)
    finally:
        serve.shutdown()
