"""The jobs' command lines refuse bad input with one sentence on stderr and exit 2, before Ray starts: each job's
`main` runs in this process (the unit tests' guard fails any test that would start Ray)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def job(name: str):
    """jobs/<name>.py's `main`."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def refused(capsys, main, argv: list[str]) -> str:
    """Run `main(argv)`: it must exit 2 with one `error:` line and no traceback; that line."""
    capsys.readouterr()  # what the test printed before
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_finetune_bad_inputs(capsys, tmp_path, tiny_tokenizers):
    import torch

    from blip2_ray.fixtures.sample_coco import make_coco_karpathy_sample
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    torch.manual_seed(0)
    cfg = model_config("tiny")
    start = export_stage2(build_stage2(cfg), str(tmp_path / "start"), llm_tokenizer(cfg), cfg)
    coco = make_coco_karpathy_sample(str(tmp_path / "coco"), num_train=6, num_test=2, image_size=32)
    main = job("finetune")
    base = ["--config", str(ROOT / "jobs/configs/finetune_caption_tiny.yaml"), "--set", f"model.init_from={start}",
            "--set", f"annotations.image_root={tmp_path}", "--set", f"annotations.eval={coco['test']}"]
    assert "none of the 6 images" in refused(capsys, main, base + ["--set", f"annotations.train={coco['train']}"])
    assert "no known format" in refused(capsys, main, base + ["--set", f"annotations.train={start}/config.json"])
    assert "remove model.llm.prompt" in refused(capsys, main, base + ["--set", f"annotations.train={coco['train']}",
                                                                      "--set", "task=vqa"])


def test_evaluate_bad_inputs(capsys, tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"task: retrieval\nmodel: {tmp_path / 'nope'}\ntest_set: {{annotations: {tmp_path / 'a.json'}}}\n")
    main = job("evaluate")
    err = refused(capsys, main, ["--config", str(cfg)])
    assert err.startswith("error: model") and "nope" in err
    assert "unknown config key 'tsk'" in refused(capsys, main, ["--config", str(cfg), "--set", "tsk=x"])


def test_capfilt_bad_models(capsys, tmp_path):
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "in"), "webdataset", num=2, shards=1, image_size=32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: [{tmp_path / 'in'}]\noutput_dir: {tmp_path / 'out'}\n"
                   f"captioner: {{model: {tmp_path / 'nope'}}}\nfilter: {{model: {tmp_path / 'nope'}}}\n")
    main = job("capfilt")
    err = refused(capsys, main, ["--config", str(cfg)])
    assert err.startswith("error: filter.model") and "nope" in err
    assert "keep must be >= 1" in refused(capsys, main, ["--config", str(cfg), "--set", "filter.keep=0"])
    bert = tmp_path / "bert-base-uncased"  # a model directory, but not a CLIP one
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    err = refused(capsys, main, ["--config", str(cfg), "--set", "filter.kind=clip", "--set", f"filter.model={bert}"])
    assert err.startswith("error: filter.model") and "filter.kind=clip needs a CLIPModel" in err


@pytest.mark.parametrize("args,needle", [(["/no/such/shards"], "does not exist"),
                                         (["x", "--set", "data.imag_size=3"], "unknown config key")])
def test_check_data_bad_inputs(capsys, args, needle):
    assert needle in refused(capsys, job("check_data"), args)
