"""Serve BLIP-2 over HTTP until SIGINT/SIGTERM.

    blip2-ray serve --model DIR [--retrieval-model DIR [--search-index INDEX]] [--host 127.0.0.1] [--port 8000]
                    [--config jobs/configs/serve.yaml-args.yaml] [--set max_batch_size=16 ...]
                    [--address ADDR]

DIR is an HF-format `Blip2ForConditionalGeneration` directory (a stage-2 export or a local copy of
Salesforce/blip2-opt-2.7b); the retrieval model a stage-1 export or `Blip2ForImageTextRetrieval`
directory; the search index a directory `blip2-ray index` built with that retrieval model (POST /v1/search,
docs/search.md). Precedence: ServeConfig defaults <- --config YAML (a ServeConfig mapping) <- flags <- --set.
Joins the cluster at --address (or RAY_ADDRESS), else starts a local Ray instance. The same app runs
with `serve run jobs/configs/serve.yaml` (import_path blip2_ray.serve.app:app_builder).
"""

from __future__ import annotations

import argparse
import signal
import threading

from blip2_ray.runtime.cli import cli_main, job_parser
from blip2_ray.runtime.cluster import init_ray


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__.split("\n\n")[0], prog="blip2-ray serve", config_help="YAML mapping of ServeConfig keys",
                   config_required=False)
    p.add_argument("--model", help="stage-2 / Blip2ForConditionalGeneration directory (caption, vqa, chat)")
    p.add_argument("--retrieval-model", help="stage-1 / Blip2ForImageTextRetrieval directory (embeddings, match)")
    p.add_argument("--search-index", help="index directory from blip2-ray index, built with --retrieval-model (search)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    return p.parse_args(argv)


def load_serve_config(args: argparse.Namespace):
    """ServeConfig from --config, the flags and --set (validated strictly)."""
    from blip2_ray.config import from_dict, merge, parse_set, read_yaml
    from blip2_ray.serve.config import ServeConfig

    data = read_yaml(args.config) if args.config else {}
    flags = {"model": args.model, "retrieval_model": args.retrieval_model, "host": args.host, "port": args.port}
    data = merge(data, {k: v for k, v in flags.items() if v is not None})
    if args.search_index:
        data = merge(data, {"search": {"index": args.search_index}})
    for item in args.set:
        data = merge(data, parse_set(item))
    return from_dict(ServeConfig, data)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_serve_config(args)  # config errors surface before Ray starts
    from blip2_ray.serve.model_kinds import check_servable

    check_servable(cfg)  # a directory the app cannot serve: one sentence, before Ray or Serve start

    import ray
    from ray import serve

    from blip2_ray.serve.app import build_app
    from blip2_ray.serve.config import served_model_names

    own_cluster = init_ray(args.address, include_dashboard=False, progress=args.progress)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    names = " and ".join(served_model_names(cfg))
    print(f"serving {names} on http://{cfg.host}:{cfg.port} (docs at /docs); Ctrl-C stops", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print("stopping", flush=True)
    if own_cluster:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(cfg.app_name)  # leave the cluster's other applications alone
    return 0

