"""What the Serve app can serve is decided before Ray Serve deploys anything: a directory of the wrong kind for
`--model` / `--retrieval-model` (e.g. a VQA fine-tune as the retrieval model) is one sentence and exit 2 from
jobs/serve.py, before Ray starts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from blip2_ray.config import from_dict
from blip2_ray.errors import UserError
from blip2_ray.serve.config import ServeConfig
from blip2_ray.serve.model_kinds import check_servable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizers):
    """Tiny stage-1 and stage-2 exports, a VQA-layout copy of the stage-2 one, a directory holding no model."""
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage1, build_stage2
    from blip2_ray.weights.hf_format import export_stage1, export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    cfg = model_config("tiny")
    export_stage1(build_stage1(cfg), str(root / "stage1"), qformer_tokenizer(cfg), cfg)
    export_stage2(build_stage2(cfg), str(root / "stage2"), llm_tokenizer(cfg), cfg)
    # what the app decides on is config.json and the file list: a VQA export differs from stage 2 there
    shutil.copytree(root / "stage2", root / "vqa")
    data = json.loads((root / "vqa" / "config.json").read_text())
    data.update(model_type="instructblip", architectures=["InstructBlipForConditionalGeneration"])
    (root / "vqa" / "config.json").write_text(json.dumps(data))
    (root / "data").mkdir()
    (root / "data" / "00000.tar").write_bytes(b"")
    return {k: str(root / k) for k in ("stage1", "stage2", "vqa", "data")}


def cfg(**kw) -> ServeConfig:
    return from_dict(ServeConfig, kw)


def test_the_right_kinds_pass(dirs):
    assert check_servable(cfg(model=dirs["stage2"], retrieval_model=dirs["stage1"])) == {
        "model": "stage2", "retrieval_model": "stage1"}
    assert check_servable(cfg(model=dirs["vqa"])) == {"model": "vqa"}  # question-aware: served (/v1/vqa, chat)


@pytest.mark.parametrize("kw,needle", [
    (dict(model="stage1"), r"model \(--model\) '.*stage1' is a stage-1 \(retrieval\) export.*; give it as "
                           r"retrieval_model \(--retrieval-model\)"),
    (dict(model="stage2", retrieval_model="stage2x"), r"retrieval_model \(--retrieval-model\) '.*stage2' is a "
                                                      r"stage-2 export.*give it as model \(--model\)"),
    (dict(retrieval_model="vqa"), r"is a VQA fine-tune .*give it as model \(--model\)"),
    (dict(retrieval_model="data"), r"'.*data' holds no model \(no config.json\)"),
])
def test_a_directory_the_app_cannot_serve_is_one_sentence(dirs, kw, needle):
    paths = {k: dirs[v.rstrip("x")] for k, v in kw.items()}
    if "retrieval_model" in paths and "model" in paths and paths["model"] == paths["retrieval_model"]:
        paths["model_name"] = "other"  # names must differ; the kind check is what is tested
    with pytest.raises(UserError, match=needle) as e:
        check_servable(cfg(**paths))
    assert "\n" not in str(e.value)


def test_a_missing_weight_file_is_named(dirs, tmp_path):
    shutil.copytree(dirs["stage1"], tmp_path / "s1")
    os.remove(tmp_path / "s1" / "model.safetensors")
    with pytest.raises(UserError, match=r"has no weights \(model.safetensors"):
        check_servable(cfg(retrieval_model=str(tmp_path / "s1")))


def test_serve_job_refuses_before_ray_starts(dirs, capsys):
    """The stage-1 export where the stage-2 one belongs: exit 2, one `error:` line, no traceback; jobs/serve.py's
    main runs in this process, where the unit tests' guard fails any ray.init."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_job", ROOT / "jobs/serve.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    capsys.readouterr()
    assert job.main(["--model", dirs["stage1"], "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model (--model)") and err.count("\n") == 1, err
    assert "is a stage-1 (retrieval) export" in err and "give it as retrieval_model (--retrieval-model)" in err
