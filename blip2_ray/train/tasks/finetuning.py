"""What fine-tuning adds to a pre-training task (paper sections 4.2-4.4): the ViT trains (train/finetune_model.py),
training rows come from annotation files packed into parquet shards once, and the end of training evaluates
the export on held-out annotations with the evaluation job's task of the same name.

`train/finetune_job.py` asks a fine-tuning task for:
    read_annotations  the training annotations (checked: files, images) -> what pack_shards writes
    pack_shards       those annotations into parquet shards under `out_dir` -> the shards' manifest
    shards_fingerprint  what the shards were packed from (a resumed run, or s3:// storage, reuses matching ones)
    resolve_start     the config with the starting model where the task reads it
    start_dir         the starting model as an export directory the evaluation can read (None: assembled from parts)
    packed_line       the log line saying what pack_shards wrote
    has_evaluation    whether the config names held-out data to evaluate
    evaluate          the task's metrics of an export directory on that held-out data
"""

from __future__ import annotations

from blip2_ray.train.tasks.base import TaskSpec


class Finetuning(TaskSpec):
    """Mixed in before a pre-training task: the same model and step, with the ViT trained and an evaluation."""

    rows = "pairs"  # what a training row is, for the progress line

    @property
    def evaluation(self) -> str:
        return self.name

    def build_model(self, cfg, construction=None):
        from blip2_ray.train.finetune_model import finetune_model

        model = super().build_model(cfg, construction)
        finetune_model(model, cfg)
        return model

    def lr_scale(self, model, cfg):
        from blip2_ray.train.finetune_model import vit_lr_scale

        return vit_lr_scale(model, cfg)

    def read_annotations(self, cfg):
        from blip2_ray.data.annotations import read_caption_annotations

        a = cfg.annotations
        return read_caption_annotations(a.train, a.image_root, a.train_split, "annotations.train")

    def shards_fingerprint(self, cfg) -> str:
        from blip2_ray.data.annotations import fingerprint

        a = cfg.annotations
        return fingerprint(a.train, a.image_root, a.train_split)

    def pack_shards(self, cfg, ann, out_dir: str) -> dict:
        from blip2_ray.data.annotations import write_caption_shards

        return write_caption_shards(ann, out_dir, cfg.annotations.shard_records, self.shards_fingerprint(cfg))

    def packed_line(self, cfg, manifest: dict, seconds: float) -> str:
        a = cfg.annotations
        return (f"[finetune] {manifest['rows']} training {self.rows} of {manifest['images']} images in "
                f"{len(manifest['files'])} shards ({seconds:.1f} s); {manifest['missing_images']} images of "
                f"{a.train} missing under {a.image_root!r}, skipped")

    def has_evaluation(self, cfg) -> bool:
        return bool(cfg.annotations.eval)

    def evaluate(self, cfg, model_dir: str, output: str) -> dict:
        """The task's metrics of `model_dir` on annotations.eval, through the evaluation job's code."""
        from blip2_ray.config import from_dict, to_dict
        from blip2_ray.eval.config import EvalConfig
        from blip2_ray.eval.job import run_evaluation

        a, e = cfg.annotations, cfg.evaluation
        ecfg = from_dict(EvalConfig, {
            "task": self.evaluation, "model": model_dir, "output": output,
            "test_set": {"annotations": a.eval, "image_root": a.eval_image_root or a.image_root,
                         "split": a.eval_split, "limit": e.limit, "questions": a.eval_questions},
            "generation": to_dict(e.generation), "retrieval": to_dict(e.retrieval), "compute": to_dict(e.compute),
            "data": {"image_size": cfg.data.image_size, "qformer_max_len": cfg.data.qformer_max_len},
            "vqa_rules": e.vqa_rules, "meteor": e.meteor,
        })
        return run_evaluation(ecfg)["metrics"]

    def resolve_start(self, cfg):
        return cfg

    def start_dir(self, cfg) -> str | None:
        raise NotImplementedError
