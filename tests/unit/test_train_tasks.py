"""The task specs (train/tasks): one per task, found by the config's task name; the loop and the driver know none."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import torch

from blip2_ray.config import from_dict
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.fault_injection import step_hooks
from blip2_ray.train.finetune_config import TASK_STAGE, FinetuneConfig
from blip2_ray.train.tasks import TASKS, task_of

ROOT = Path(__file__).resolve().parents[2]


def _finetune(task: str) -> FinetuneConfig:
    return from_dict(FinetuneConfig, {"task": task, "annotations": {"train": "a.json"}, "data": {"image_size": 32},
                                      "model": {"init_from": "stage1"} if task != "caption" else {}})


def test_every_task_a_config_can_name_has_a_spec_of_its_stage():
    assert task_of(from_dict(PretrainConfig, {"stage": 1, "data": {"image_size": 32}})).name == "stage1"
    assert task_of(from_dict(PretrainConfig, {"stage": 2, "data": {"image_size": 32}})).name == "stage2"
    names = typing.get_args(typing.get_type_hints(FinetuneConfig)["task"])
    assert set(names) == set(TASK_STAGE) and set(names) <= set(TASKS)
    for name in names:
        assert TASKS[name].stage == TASK_STAGE[name] and TASKS[name].evaluation == name
    assert TASKS["stage1"].evaluation is None and TASKS["stage2"].evaluation is None


def test_each_task_names_the_token_columns_its_batches_hold(tiny_tokenizers):
    pre1, pre2 = (from_dict(PretrainConfig, {"stage": s, "data": {"image_size": 32}}) for s in (1, 2))
    assert task_of(pre1).tokenizer_dirs(pre1) == (tiny_tokenizers["qformer"], None)
    assert task_of(pre2).tokenizer_dirs(pre2) == (None, tiny_tokenizers["opt"])
    cap = _finetune("caption")
    assert task_of(cap).tokenizer_dirs(cap) == (None, tiny_tokenizers["opt"])


class _Engine:
    """Records the call a task's forward makes."""

    device = torch.device("cpu")

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return {"loss": torch.zeros(())}


def _batch(**extra) -> dict:
    ids = torch.ones(2, 4, dtype=torch.long)
    return {"pixel_values": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "key": ["a/0", "b/0"],
            "qformer_input_ids": ids, "qformer_attention_mask": ids, "llm_input_ids": 2 * ids,
            "llm_attention_mask": ids, **extra}


def test_forward_calls_differ_by_task_only_in_the_spec():
    calls = {}
    for name in ("stage1", "stage2", "caption", "retrieval", "vqa"):
        engine = _Engine()
        TASKS[name].forward(engine, _batch(llm_prompt_length=torch.tensor([1, 2])), rank=0)
        calls[name] = engine
        assert engine.args[0].dtype == torch.float32  # the pixels normalised on the device
    assert torch.equal(calls["stage1"].args[1], torch.ones(2, 4, dtype=torch.long))  # Q-Former tokens
    assert set(calls["stage1"].kwargs) == {"rank", "gather"}
    assert set(calls["retrieval"].kwargs) == {"rank", "gather", "gather_with_grad", "image_ids"}
    assert calls["retrieval"].kwargs["image_ids"][0] != calls["retrieval"].kwargs["image_ids"][1]
    assert torch.equal(calls["stage2"].args[1], 2 * torch.ones(2, 4, dtype=torch.long)) and not calls["stage2"].kwargs
    assert not calls["caption"].kwargs
    assert set(calls["vqa"].kwargs) == {"prompt_lengths", "question_ids", "question_mask"}


def test_the_loop_and_the_driver_know_no_task():
    for module in ("loop", "trainer"):
        source = (ROOT / "blip2_ray/train" / f"{module}.py").read_text()
        tree = ast.parse(source)
        assert "FinetuneConfig" not in source and "llm_prompt_length" not in source, module
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp)):
                assert ".stage" not in ast.unparse(node.test) and ".task" not in ast.unparse(node.test), \
                    f"{module}.py:{node.lineno} branches on the task"


def test_fault_injection_is_off_by_default_and_a_hook_when_set(tmp_path):
    cfg = from_dict(PretrainConfig, {"data": {"image_size": 32}})
    hooks = step_hooks(cfg, rank=1, world=2, start_step=0)
    hooks.before_step(0)
    hooks.after_micro_batch(1, 0, _batch())
    assert not list(tmp_path.iterdir())
    cfg.fault_injection.trained_keys_dir = str(tmp_path / "keys")
    cfg.fault_injection.pid_dir, cfg.fault_injection.at_step = str(tmp_path / "pids"), 3
    step_hooks(cfg, rank=0, world=2, start_step=4).before_step(2)  # only the last rank pauses
    assert not (tmp_path / "pids").exists()
    hooks = step_hooks(cfg, rank=1, world=2, start_step=4)
    hooks.before_step(1)
    assert not (tmp_path / "pids").exists()
    hooks.before_step(2)
    assert (tmp_path / "pids/worker.pid").is_file()
    hooks.after_micro_batch(5, 1, _batch())
    lines = (tmp_path / "keys/rank1.txt").read_text().splitlines()
    assert [line.split()[:4] for line in lines] == [["4", "5", "1", "a/0"], ["4", "5", "1", "b/0"]]
