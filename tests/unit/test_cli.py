"""The `blip2-ray` console command ([project.scripts] -> blip2_ray.cli:main) and the thin jobs/ files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blip2_ray import cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_console_script_is_the_cli_main_and_lists_every_command(capsys):
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    assert re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M) == [("blip2-ray", "blip2_ray.cli:main")]
    assert set(cli.COMMANDS) >= {"pretrain", "finetune", "evaluate", "capfilt", "serve", "check-data",
                                 "make-sample-data"}
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, module in cli.COMMANDS.items():
        assert f"  {name} " in out and cli.summary(module) in out
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'; valid commands: pretrain" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_a_command_is_one_line_in_the_registry(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "sample", "blip2_ray.cli.make_sample_data")
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0 and "usage: blip2-ray make-sample-data" in capsys.readouterr().out


def test_make_sample_data_runs_through_the_command(tmp_path, capsys):
    assert cli.main(["make-sample-data", "--out", str(tmp_path), "--num", "6", "--shards", "2", "--image-size",
                     "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["good"] == 6 and len(summary["files"]) == 2
    assert cli.main(["make-sample-data", "--out", str(tmp_path / "x"), "--corrupt", "nope=1"]) == 2
    assert "unknown kind 'nope'" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command():
    r = subprocess.run([sys.executable, "-m", "blip2_ray.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "make-sample-data" in r.stdout


@pytest.mark.parametrize("folder", ["jobs", "bench"])
def test_jobs_and_benchmarks_import_the_installed_package_without_touching_sys_path(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        assert "sys.path" not in path.read_text().replace("(the script's folder is on sys.path)", ""), path


def test_each_command_has_its_thin_job_file_for_ray_job_submit():
    for module in cli.COMMANDS.values():
        path = ROOT / "jobs" / f"{module.rsplit('.', 1)[1]}.py"
        text = path.read_text()
        assert f"from {module} import" in text and "sys.exit(main())" in text, path
        assert len(text.splitlines()) <= 15, f"{path} is not thin"
