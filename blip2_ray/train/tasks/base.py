"""What the training loop knows of a task: a TaskSpec, found by the config's task name (train/tasks/__init__.py).

`train/loop.py` (the worker) and `train/trainer.py` (the driver) call only these, so they run any task:

    build_model       the seeded model; `construction` builds the frozen parts partitioned (ZeRO-3)
    lr_scale          parameter name -> learning-rate multiplier (None: one learning rate)
    tokenizer_dirs    what a batch holds: (Q-Former tokenizer dir, LLM tokenizer dir) of the token columns
                      the data pipeline writes (qformer_* / llm_*), None for a column the task does not read
    check_inputs      the task's own checks on the driver, before any worker starts
    host_tensors      tensors a batch needs beyond the pipeline's, computed on the host in the feed thread
    forward           one micro batch (the pipeline's tensors) through the engine -> its StepOutput
    export_tokenizers what the HF export of `stage`'s layout saves beside the weights
    evaluation        the evaluation job's task (eval/) that measures it on held-out data; None: none

Fine-tuning tasks add what `train/finetune_job.py` asks of them (train/tasks/finetuning.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from blip2_ray.model.partitioned import FrozenConstruction
    from blip2_ray.train.config import PretrainConfig


class TaskSpec:
    name: str = ""
    stage: int = 0  # the stage model it trains (1: the Q-Former's objectives, 2: the Q-Former before the LLM)
    evaluation: str | None = None

    def build_model(self, cfg: PretrainConfig, construction: FrozenConstruction | None = None) -> nn.Module:
        raise NotImplementedError

    def lr_scale(self, model: nn.Module, cfg: PretrainConfig) -> Callable[[str], float] | None:
        return None

    def tokenizer_dirs(self, cfg: PretrainConfig) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def check_inputs(self, cfg: PretrainConfig) -> None:
        """One sentence before any worker starts (the loop's own checks run in train/trainer.check_inputs)."""

    def host_tensors(self, batch: dict, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
        """Extra tensors of `batch` (computed from its host columns, e.g. its keys), moved to the device with the
        pipeline's; `forward` finds them in `train.batches.device_tensors(batch, device)`."""
        return {}

    def forward(self, engine, batch: dict, rank: int):
        raise NotImplementedError

    def export_tokenizers(self, cfg: PretrainConfig, module: nn.Module) -> tuple[object, object | None]:
        """(the tokenizer of the stage's layout, the question-aware Q-Former's tokenizer or None)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def batch_tensors(batch: dict, device: torch.device, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values normalised, input_ids, attention_mask) of the stage's token columns, on `device`."""
    from blip2_ray.train.batches import to_device

    return to_device(batch, device, stage)
