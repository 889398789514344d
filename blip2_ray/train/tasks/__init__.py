"""The tasks a training run can train, by name: a config names its task (`PretrainConfig.task_name`: "stage1" /
"stage2", a FinetuneConfig's `task`), and the loop and the driver run that task's TaskSpec (train/tasks/base.py).

A new task: a TaskSpec subclass in its own module here (subclass the task it resembles: VqaFinetuning for a
question-aware one) and one line in TASKS; a fine-tuning task also names itself in FinetuneConfig.task and
TASK_STAGE (train/finetune_config.py).
"""

from __future__ import annotations

from blip2_ray.train.tasks.base import TaskSpec
from blip2_ray.train.tasks.caption import CaptionFinetuning
from blip2_ray.train.tasks.instruct import InstructFinetuning
from blip2_ray.train.tasks.pretraining import Stage1Pretraining, Stage2Pretraining
from blip2_ray.train.tasks.retrieval import RetrievalFinetuning
from blip2_ray.train.tasks.vqa import VqaFinetuning

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    Stage1Pretraining(),
    Stage2Pretraining(),
    CaptionFinetuning(),
    RetrievalFinetuning(),
    VqaFinetuning(),
    InstructFinetuning(),
)}


def task_of(cfg) -> TaskSpec:
    """The TaskSpec of a job config (PretrainConfig or FinetuneConfig)."""
    return TASKS[cfg.task_name]


__all__ = ["TASKS", "TaskSpec", "task_of"]
