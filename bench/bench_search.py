"""Search: indexing throughput of the Ray Data job vs a single-process loop (same tiny model, same shards),
then query latency, recall@10 against the exact ranking and index bytes per image at 10^4, 10^5 and 10^6
images of synthetic BLIP-2-size features (32 query vectors of 256 floats per image).

Part 1 (indexing): generated shards (JPEGs of --image-size px), a tiny random stage-1 export; the loop is
the job's own worker class (`ShardIndexer.index_shard`, model loading included) shard after shard in this
process; the job is `run_index` on a local Ray instance (Ray Data and actor start-up included; its rate
once the first shard is back is reported too). Rounds alternate the order; each round's ratio is reported.
Part 2 (the index at scale): `SyntheticCollection` (blip2_ray/search/synthetic.py), streamed a chunk at a
time; the exact ranking by flat indexes chunk by chunk (`exact_top_images`). For each size: the exact
(flat) index where it fits in --flat-max-gib, and the compressed one at the job's defaults (kind ivfpq,
`IndexSection()`), both searched one query at a time as the search deployment does (text -> k=10 and
k'=128 candidates), with the exact re-scoring of the IVF-PQ candidates drawing their features from the
generator (the deployment reads them from the memory-mapped shard files), on --query-threads FAISS threads.
Also /v1/search's engine on the tiny index (ITM re-ranking of 128 candidates included).

    python bench/bench_search.py [--sizes 1e4,1e5,1e6] [--queries 200] [--index-images 1600] [--rounds 2] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: FAISS runs on its OpenMP (search/index.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def indexing(args, work: str) -> dict:
    import ray
    import torch

    from blip2_ray.config import from_dict, to_dict
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.model.config import model_config
    from blip2_ray.search.config import IndexJobConfig
    from blip2_ray.search.engine import SearchEngine
    from blip2_ray.search.job import plan, run_index
    from blip2_ray.search.worker import ShardIndexer
    from blip2_ray.weights.builders import build_stage1
    from blip2_ray.weights.hf_format import export_stage1
    from blip2_ray.weights.tokenizer_paths import qformer_tokenizer

    torch.manual_seed(0)
    mcfg = model_config("tiny")
    model = export_stage1(build_stage1(mcfg), f"{work}/stage1", qformer_tokenizer(mcfg), mcfg)
    make_sample_shards(f"{work}/shards", num=args.index_images, shards=args.shards, image_size=args.image_size)

    def cfg(out: str) -> IndexJobConfig:
        return from_dict(IndexJobConfig, {"input": [f"{work}/shards"], "output_dir": out, "model": model,
                                          "compute": {"num_actors": args.actors, "num_cpus_per_actor": 1,
                                                      "batch_size": 64, "dtype": "float32"}})

    def loop(r: int) -> float:
        c = cfg(f"{work}/loop_{r}")
        _, todo, ident = plan(c)
        t0 = time.perf_counter()
        w = ShardIndexer(to_dict(c))
        n = sum(w.index_shard(f, ident["fingerprint"])["images"] for f in list_shards(f"{work}/shards"))
        assert n == args.index_images
        return n / (time.perf_counter() - t0)

    def job(r: int) -> float:
        t0 = time.perf_counter()
        s = run_index(cfg(f"{work}/job_{r}"))
        assert s["images_now"] == args.index_images
        runs["job_after_first_shard"].append(s["images_per_s_after_first_shard"])
        return s["images_now"] / (time.perf_counter() - t0)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}})
    runs: dict[str, list[float]] = {"loop": [], "job": [], "job_after_first_shard": []}
    for r in range(args.rounds):
        for mode in (("loop", "job") if r % 2 == 0 else ("job", "loop")):
            runs[mode].append((loop if mode == "loop" else job)(r))
        print(f"round {r + 1}: loop {runs['loop'][-1]:.1f}, job {runs['job'][-1]:.1f} images/s", flush=True)
    ray.shutdown()

    # /v1/search's engine on the job's index: text -> 128 candidates -> ITM + ITC re-ranking
    engine = SearchEngine(f"{work}/job_0", model)
    lat = []
    for i in range(args.engine_queries):
        t0 = time.perf_counter()
        engine.search_text(f"a picture of a red circle {i}", 10, candidates=128)
        lat.append(time.perf_counter() - t0)
    ratios = [j / s for j, s in zip(runs["job"], runs["loop"])]
    m = json.load(open(f"{work}/job_0/index.json"))
    table_bytes = os.path.getsize(f"{work}/job_0/{m['images_file']}") / m["num_images"]
    return {"images": args.index_images, "shards": args.shards, "actors": args.actors, "rounds": args.rounds,
            "loop_images_per_s": statistics.median(runs["loop"]), "job_images_per_s": statistics.median(runs["job"]),
            "job_images_per_s_after_first_shard": statistics.median(runs["job_after_first_shard"]),
            "job_vs_loop": statistics.median(ratios), "job_vs_loop_range": [min(ratios), max(ratios)],
            "images_table_bytes_per_image": table_bytes,
            "per_round": runs, "engine_text_rerank128_ms_p50": 1000 * float(np.percentile(lat, 50)),
            "engine_text_rerank128_ms_p99": 1000 * float(np.percentile(lat, 99))}


def _latency(fn, queries, threads: int) -> tuple[float, float, list]:
    """p50, p99 (ms) of one query at a time on `threads` FAISS threads, and the results."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    out, times = [], []
    try:
        for q in queries:
            t0 = time.perf_counter()
            out.append(fn(q[None]))
            times.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(before)
    return 1000 * float(np.percentile(times, 50)), 1000 * float(np.percentile(times, 99)), out


def _bytes(index, work: str) -> int:
    import faiss

    path = f"{work}/size.faiss"
    faiss.write_index(index, path)
    n = os.path.getsize(path)
    os.remove(path)
    return n


def at_size(n: int, args, work: str) -> dict:
    """One pass over a synthetic collection of n images into the exact ranking, the flat index (where it
    fits) and the IVF-PQ index at the job's defaults (trained first on a seeded vector sample); then the
    queries, one at a time."""
    import faiss

    from blip2_ray.search import index as ix
    from blip2_ray.search.config import IndexSection
    from blip2_ray.search.synthetic import ExactTop, SyntheticCollection

    coll = SyntheticCollection(n)
    q, e = coll.num_queries, coll.dim
    text = coll.text_queries(args.queries)
    row: dict = {"images": n, "vectors": n * q}
    seconds = {"generate": 0.0, "exact_ranking": 0.0, "flat_add": 0.0, "ivfpq_train": 0.0, "ivfpq_add": 0.0}

    d = IndexSection()
    params = ix.ivfpq_params(n * q, e, d.nlist, d.pq_m, d.train_vectors)
    index = ix.new_index(ix.IVFPQ, e, params)
    picks = np.sort(np.random.default_rng(0).choice(n * q, size=min(d.train_vectors, n * q), replace=False))
    images, where = np.unique(picks // q, return_inverse=True)
    sample = coll.features(images)[where, picks % q]  # the sampled vectors themselves, as the job samples
    t0 = time.perf_counter()
    ix.train(index, sample)
    seconds["ivfpq_train"] = time.perf_counter() - t0
    del sample

    flat_gib = n * q * e * 4 / 2**30
    flat = faiss.IndexFlatIP(e) if flat_gib <= args.flat_max_gib else None
    exact = ExactTop(text, 10, q)
    t_gen = time.perf_counter()
    for start, feats in coll.chunks():
        t0 = time.perf_counter()
        seconds["generate"] += t0 - t_gen
        exact.add(start, feats)
        t1 = time.perf_counter()
        if flat is not None:
            ix.add_images(flat, feats)
        t2 = time.perf_counter()
        ix.add_images(index, feats)
        t_gen = time.perf_counter()
        seconds.update(exact_ranking=seconds["exact_ranking"] + t1 - t0, flat_add=seconds["flat_add"] + t2 - t1,
                       ivfpq_add=seconds["ivfpq_add"] + t_gen - t2)
    row.update({f"{k}_s": round(v, 1) for k, v in seconds.items()})
    top = exact.top()

    def recall(found) -> float:
        ids = [f[1][0] for f in found]  # each search: (scores (1, k), images (1, k))
        return float(np.mean([len(set(i[i >= 0]) & set(x)) / 10 for i, x in zip(ids, top)]))

    if flat is not None:
        def features(ids):
            vec = (ids[:, None] * q + np.arange(q)[None, :]).reshape(-1)
            return flat.reconstruct_batch(vec).reshape(len(ids), q, e)

        p50, p99, found = _latency(lambda x: ix.search(flat, x, 10, q, features=features), text, args.query_threads)
        row.update(flat_ms_p50=p50, flat_ms_p99=p99, flat_recall10=recall(found),
                   flat_bytes_per_image=_bytes(flat, work) / n)
        row["flat_k128_ms_p50"] = _latency(lambda x: ix.search(flat, x, 128, q, features=features), text[:50],
                                           args.query_threads)[0]
        del flat
    else:
        row["flat"] = f"not built: {flat_gib:.0f} GiB of vectors > --flat-max-gib {args.flat_max_gib}"

    ix.set_nprobe(index, d.nprobe)
    p50, p99, found = _latency(lambda x: ix.search(index, x, 10, q, features=coll.features,
                                                   refine=d.refine_factor), text, args.query_threads)
    row.update(factory=ix.factory_string(ix.IVFPQ, params), nprobe=d.nprobe, refine_factor=d.refine_factor,
               ivfpq_ms_p50=p50, ivfpq_ms_p99=p99, ivfpq_recall10=recall(found),
               ivfpq_bytes_per_image=_bytes(index, work) / n)
    p50, p99, found = _latency(lambda x: ix.search(index, x, 10, q), text, args.query_threads)
    row.update(pq_only_ms_p50=p50, pq_only_ms_p99=p99, pq_only_recall10=recall(found))
    row["ivfpq_k128_ms_p50"] = _latency(lambda x: ix.search(index, x, 128, q, features=coll.features,
                                                            refine=d.refine_factor), text[:50], args.query_threads)[0]
    sweep = {}  # recall@10 of other settings (the deployment's search.nprobe; the job's index.refine_factor)
    for nprobe in (d.nprobe, 2 * d.nprobe):
        ix.set_nprobe(index, nprobe)
        for refine in (8, 16):
            res = _latency(lambda x, r=refine: ix.search(index, x, 10, q, features=coll.features, refine=r), text,
                           args.query_threads)
            sweep[f"nprobe{nprobe}_refine{refine}"] = {"recall10": recall(res[2]), "ms_p50": res[0]}
    row["ivfpq_sweep"] = sweep
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="synthetic collection sizes (images); '' for none")
    p.add_argument("--queries", type=int, default=200, help="text queries per size (latency, recall)")
    p.add_argument("--query-threads", type=int, default=1,
                   help="FAISS threads per query (a search replica uses int(cpus_per_replica), at least 1)")
    p.add_argument("--flat-max-gib", type=float, default=8.0, help="largest exact index built (GiB of vectors)")
    p.add_argument("--index-images", type=int, default=4000, help="images the tiny model indexes (part 1)")
    p.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs (decoded, then resized "
                                                               "to the model's 32 px)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--engine-queries", type=int, default=20)
    p.add_argument("--skip-indexing", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_search_")
    out: dict = {"cpus": os.cpu_count()}
    if not args.skip_indexing:
        out["indexing"] = s = indexing(args, work)
        print(f"indexing {s['images']} images ({s['shards']} shards, tiny model): single-process loop "
              f"{s['loop_images_per_s']:.1f} images/s, job ({s['actors']} actors) {s['job_images_per_s']:.1f} "
              f"images/s = {s['job_vs_loop']:.2f}x (rounds {s['job_vs_loop_range'][0]:.2f}-"
              f"{s['job_vs_loop_range'][1]:.2f}; start-up included), "
              f"{s['job_images_per_s_after_first_shard']:.1f} images/s once the first shard is back; "
              f"/v1/search engine, text with ITM re-ranking of 128: "
              f"p50 {s['engine_text_rerank128_ms_p50']:.0f} ms, p99 {s['engine_text_rerank128_ms_p99']:.0f} ms",
              flush=True)
    out["sizes"] = rows = [at_size(int(float(s)), args, work) for s in args.sizes.split(",") if s.strip()]
    print("\n| images | exact: p50 / p99 ms (k=10), recall@10, bytes/image | IVF-PQ + exact re-score: p50 / p99 ms, "
          "recall@10, bytes/image | PQ scores only: recall@10 | k'=128 p50 ms exact / IVF-PQ |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        flat = (f"{r['flat_ms_p50']:.1f} / {r['flat_ms_p99']:.1f}, {r['flat_recall10']:.3f}, "
                f"{r['flat_bytes_per_image']:.0f}") if "flat_ms_p50" in r else r["flat"]
        print(f"| {r['images']:,} | {flat} | {r['ivfpq_ms_p50']:.1f} / {r['ivfpq_ms_p99']:.1f}, "
              f"{r['ivfpq_recall10']:.3f}, {r['ivfpq_bytes_per_image']:.0f} ({r['factory']}, nprobe {r['nprobe']}) | "
              f"{r['pq_only_recall10']:.3f} | {r.get('flat_k128_ms_p50', float('nan')):.1f} / "
              f"{r['ivfpq_k128_ms_p50']:.1f} |", flush=True)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
