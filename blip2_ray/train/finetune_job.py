"""Driver side of fine-tuning: check the annotations and the starting model, pack the annotated images into
parquet shards once, evaluate the starting model (optional), train on the pre-training loop, evaluate the export.

`run_finetune(cfg)` is what `blip2-ray finetune` (and the tests) call once Ray is up. What differs by task (caption,
retrieval, vqa) is the task's TaskSpec (train/tasks/finetuning.py): its annotations, its shards, its start.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

from blip2_ray.errors import UserError
from blip2_ray.runtime.files import write_json_atomic
from blip2_ray.train.finetune_config import FinetuneConfig
from blip2_ray.train.finetune_model import vit_training_gib
from blip2_ray.train.tasks import task_of

REPORT_FILE = "finetune_report.json"
# trunk parameters of the real ViTs (EVA ViT-g/14 with 39 blocks, CLIP ViT-L/14 with 23)
VIT_PARAMS = {"eva_vit_g": 985_000_000, "clip_vit_l": 291_000_000}


def resolve_start(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config with the starting model where its task reads it (caption / vqa: `model.init_from` naming a
    Blip2ForConditionalGeneration directory becomes `model.hf_path`: the whole model starts from it)."""
    return task_of(cfg).resolve_start(cfg)


def start_dir(cfg: FinetuneConfig) -> str | None:
    """The starting model as an export directory the evaluation can read (None: it is assembled from parts)."""
    return task_of(cfg).start_dir(cfg)


def check_finetune_inputs(cfg: FinetuneConfig):
    """One sentence before any worker starts: the task, the annotations and their images, the start model.

    Returns the training annotations (missing images counted, not fatal unless none resolves).
    """
    from blip2_ray.weights.weight_sources import check_weight_sources

    check_weight_sources(cfg.model, cfg.stage)  # the starting model, before the images are packed
    if cfg.llm_lora.enabled:  # a target module the LLM lacks: one sentence naming those it has
        from blip2_ray.weights.lora_targets import check_lora_targets

        check_lora_targets(cfg.model, cfg.llm_lora.target_modules)
    a = cfg.annotations
    task = task_of(cfg)
    ann = task.read_annotations(cfg)
    for name in ("eval", "eval_questions"):
        value = getattr(a, name)
        if value and not os.path.isfile(value):
            raise UserError(f"annotations.{name} {value!r} does not exist")
    if cfg.evaluation.zero_shot and not (start_dir(cfg) and task.has_evaluation(cfg)):
        raise UserError("evaluation.zero_shot needs annotations.eval and a whole starting model (caption / vqa: "
                        "model.hf_path or model.init_from naming a Blip2ForConditionalGeneration directory; "
                        "retrieval: model.init_from naming a stage-1 export directory)")
    return ann


def start_warnings(cfg: FinetuneConfig) -> list[str]:
    """What the job says once at start about the unfrozen ViT's memory."""
    vt, m = cfg.vision_training, cfg.model
    if vt.freeze_vit or m.preset.startswith("tiny"):
        return []
    n = VIT_PARAMS.get(m.vision.kind, 0)
    gib = vit_training_gib(n, cfg.scaling.num_workers, cfg.deepspeed.zero_stage)
    unsharded = vit_training_gib(n, 1, 2)
    if cfg.scaling.num_workers == 1:
        return [f"the unfrozen {m.vision.kind} ({n / 1e9:.2f} B parameters) trains without ZeRO sharding on 1 "
                f"worker: its float32 weights, gradients and AdamW moments alone need {unsharded:.1f} GiB on the GPU "
                f"(plus the frozen LLM and the activations); more workers shard the {unsharded - 4 * n / (1 << 30):.1f}"
                f" GiB of gradients and moments"]
    return [f"the unfrozen {m.vision.kind} needs {gib:.1f} GiB per worker for its weights, gradients and AdamW "
            f"moments under ZeRO-{cfg.deepspeed.zero_stage} over {cfg.scaling.num_workers} workers "
            f"({unsharded:.1f} GiB unsharded)"]


def prepare_shards(cfg: FinetuneConfig, ann) -> tuple[FinetuneConfig, dict]:
    """Pack the training annotations into parquet shards under the run's storage, <storage_path>/<run_name>/
    finetune_shards (once per run: a resumed run finds them by fingerprint); with s3:// storage they are packed
    in a local temporary directory and uploaded there. The config with data.train pointing at them (and the data
    reading from the storage's endpoint), and the shards' manifest."""
    task = task_of(cfg)
    t0 = time.time()
    if cfg.is_s3:
        out_dir = f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}/finetune_shards"
        manifest = s3_shards(out_dir, task.shards_fingerprint(cfg), lambda d: task.pack_shards(cfg, ann, d),
                             s3_options(cfg))
    else:
        out_dir = os.path.join(cfg.local_storage_path, cfg.run_name, "finetune_shards")
        manifest = task.pack_shards(cfg, ann, out_dir)
    print(task.packed_line(cfg, manifest, time.time() - t0), flush=True)
    cfg = copy.deepcopy(cfg)
    # one folder, or one per source mixed by weight (instruct: data/instruct_shards.write_instruct_shards)
    cfg.data.train = manifest.get("train", [out_dir])
    if manifest.get("weights"):
        cfg.data.weights = manifest["weights"]
    if cfg.is_s3 and not cfg.data.s3_endpoint_url:
        cfg.data.s3_endpoint_url = cfg.storage_endpoint_url  # the shards are read where they were written
    return cfg, manifest


def s3_options(cfg: FinetuneConfig) -> dict:
    """s3fs options of the run's storage (its endpoint, else the data's)."""
    from blip2_ray.data.sources import storage_options

    d = cfg.data
    return storage_options(cfg.storage_endpoint_url or d.s3_endpoint_url, d.s3_anonymous, d.s3_region)


def s3_shards(remote: str, fp: str, write, opts: dict) -> dict:
    """The manifest of the shards under the s3:// prefix `remote`: those already there when their manifest has
    fingerprint `fp` and every file exists, else `write(local_dir)` packed locally and uploaded (files first,
    the manifest last, so a half-finished upload is packed again)."""
    import json
    import tempfile

    from blip2_ray.data.annotations import MANIFEST
    from blip2_ray.data.sources import s3_filesystem

    fs = s3_filesystem(opts)
    bare = remote.removeprefix("s3://")
    try:
        with fs.open(f"{bare}/{MANIFEST}", "rb") as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") == fp and all(fs.exists(p.removeprefix("s3://")) for p in manifest["files"]):
            return manifest
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"storage_path {remote!r} is not readable ({e.__class__.__name__}: {str(e)[:120]}); check "
                        f"the AWS credentials and storage_endpoint_url") from None
    for stale in fs.glob(f"{bare}/*.parquet"):  # data.train is the prefix: only this packing's shards there
        fs.rm(stale)
    with tempfile.TemporaryDirectory(prefix="blip2_finetune_shards_") as local:
        manifest = write(local)
        files = []
        for path in manifest["files"]:
            target = f"{bare}/{os.path.basename(path)}"
            fs.put_file(path, target)
            files.append(f"s3://{target}")
    manifest = {**manifest, "files": files}
    with fs.open(f"{bare}/{MANIFEST}", "wb") as f:
        f.write(json.dumps(manifest).encode())
    return manifest


def evaluate(cfg: FinetuneConfig, model_dir: str, output: str) -> dict:
    """The task's metrics of `model_dir` on its held-out data (train/tasks/finetuning.py: Finetuning.evaluate)."""
    return task_of(cfg).evaluate(cfg, model_dir, output)


def absolute_annotation_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """The annotation paths and the VQA question encoder's made absolute on the driver: the workers (which read
    the question encoder) run in other directories."""
    cfg = copy.deepcopy(cfg)
    a = cfg.annotations
    for name in ("train", "questions", "eval", "eval_questions", "image_root", "eval_image_root"):
        value = getattr(a, name)
        if value:
            setattr(a, name, os.path.abspath(os.path.expanduser(value)))
    if cfg.vqa.question_encoder_from:
        cfg.vqa.question_encoder_from = os.path.abspath(os.path.expanduser(cfg.vqa.question_encoder_from))
    for s in cfg.instruct.sources:
        for name in ("train", "questions", "image_root", "eval", "eval_questions", "eval_image_root"):
            if getattr(s, name):
                setattr(s, name, os.path.abspath(os.path.expanduser(getattr(s, name))))
    if cfg.instruct.qformer_text_from:
        cfg.instruct.qformer_text_from = os.path.abspath(os.path.expanduser(cfg.instruct.qformer_text_from))
    return cfg


def run_finetune(cfg: FinetuneConfig, dataset=None) -> dict:
    """Check, pack the shards, evaluate the start (optional), train (resuming the run), export, evaluate.

    Returns the report written to <output_dir>/finetune_report.json: {"task", "metrics": {"zero_shot",
    "finetuned"}, "train": {step, loss}, "data": the shards' manifest}.
    """
    from blip2_ray.train.trainer import TrainingWarning, absolute_paths, run_pretrain

    cfg = resolve_start(absolute_annotation_paths(absolute_paths(cfg)))
    ann = check_finetune_inputs(cfg)
    for message in start_warnings(cfg):
        warnings.warn(message, TrainingWarning, stacklevel=2)
    cfg, manifest = prepare_shards(cfg, ann)
    metrics: dict = {}
    eval_dir = os.path.join(cfg.output_dir, "eval")
    if cfg.evaluation.zero_shot:
        metrics["zero_shot"] = evaluate(cfg, start_dir(cfg), os.path.join(eval_dir, "zero_shot.json"))
        print(f"[finetune] zero-shot {cfg.task} metrics of {start_dir(cfg)}: {_short(metrics['zero_shot'])}",
              flush=True)
    result = run_pretrain(cfg, dataset)
    if task_of(cfg).has_evaluation(cfg):
        metrics["finetuned"] = evaluate(cfg, cfg.output_dir, os.path.join(eval_dir, "finetuned.json"))
        print(f"[finetune] fine-tuned {cfg.task} metrics: {_short(metrics['finetuned'])}", flush=True)
    m = result.metrics or {}
    report = {"task": cfg.task, "output_dir": cfg.output_dir, "metrics": metrics,
              "train": {k: m.get(k) for k in ("step", "loss", "samples_per_s", "peak_host_rss_gib",
                                              "peak_device_memory_gib")}, "data": manifest}
    write_json_atomic(os.path.join(cfg.output_dir, REPORT_FILE), report)
    return report


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
