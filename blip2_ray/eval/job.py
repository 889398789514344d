"""Evaluation as a Ray Data batch job: check the inputs, load the test set, run the task's passes,
write the JSON report. The pieces: test_sets.py (what is evaluated), actors.py (the models in Ray
actors), passes.py (retrieval and generation passes over the test set)."""

from __future__ import annotations

import os
import time

from blip2_ray.config import to_dict
from blip2_ray.errors import UserError
from blip2_ray.eval.config import EvalConfig
from blip2_ray.eval.passes import evaluate_generation, evaluate_retrieval
from blip2_ray.eval.test_sets import load_test_set
from blip2_ray.runtime.files import write_json_atomic


def check_inputs(cfg: EvalConfig) -> None:
    """One clear sentence, before Ray starts, for a missing model or annotation file."""
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise UserError(f"model {cfg.model!r} is not a model export directory (no config.json)")
    t = cfg.test_set
    for what, path in (("test_set.annotations", t.annotations), ("test_set.questions", t.questions),
                       ("test_set.references", t.references)):
        if path and not os.path.isfile(path):
            raise UserError(f"{what} {path!r} does not exist")


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run the configured evaluation; write and return the report {"task", "model", "metrics", ...}."""
    check_inputs(cfg)
    t0 = time.time()
    ts = load_test_set(cfg)
    if cfg.task == "retrieval":
        metrics, extra = evaluate_retrieval(cfg, ts)
    else:
        metrics, extra = evaluate_generation(cfg, ts)
    report = {"task": cfg.task, "model": os.path.abspath(cfg.model), "metrics": metrics, **extra,
              "seconds": round(time.time() - t0, 1), "config": to_dict(cfg)}
    write_json_atomic(cfg.output, report)
    return report
