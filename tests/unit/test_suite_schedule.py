"""tests/conftest.py's schedule for `make test` (`-n 2 --dist loadfile`): the files that start Ray clusters of their own
run on one worker, one after the other, first; every other file is a unit of its own, longest first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from xdist.scheduler import LoadFileScheduling

ROOT = Path(__file__).resolve().parents[2]


def suite_conftest():
    spec = importlib.util.spec_from_file_location("suite_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Config:
    def __init__(self, dist: str):
        self.dist = dist

    def getvalue(self, name):
        return {"dist": self.dist, "tx": ["2*popen"]}.get(name)


def test_the_cluster_starting_files_are_one_unit_and_every_other_file_its_own():
    c = suite_conftest()
    heads = "tests/integration/test_cluster_jobs.py::test_pretrain_job_succeeds_with_checkpoint_and_export"
    nodes = "tests/integration/test_multinode.py::test_training_across_nodes_survives_losing_a_node"
    assert c.unit_of_work(heads) == c.unit_of_work(nodes) == "own_ray_clusters"
    assert c.unit_of_work("tests/unit/test_cli.py::test_a[x::y]") == "tests/unit/test_cli.py"
    assert c.unit_of_work("tests/integration/test_search.py::test_b") == "tests/integration/test_search.py"


def test_the_scheduler_is_xdist_loadfile_with_those_units_and_only_for_loadfile():
    c = suite_conftest()
    sched = c.pytest_xdist_make_scheduler(_Config("loadfile"), log=None)
    assert isinstance(sched, LoadFileScheduling)
    assert sched._split_scope("tests/integration/test_multinode.py::t") == "own_ray_clusters"
    assert sched._split_scope("tests/unit/test_cli.py::t") == "tests/unit/test_cli.py"
    assert c.pytest_xdist_make_scheduler(_Config("load"), log=None) is None  # xdist's own for any other mode


class _Item:
    def __init__(self, path: str):
        self.path = ROOT / path


def test_the_group_comes_first_then_the_ray_free_files_then_the_longest_files():
    c = suite_conftest()
    files = ["tests/unit/test_cli.py", "tests/integration/test_eval_jobs.py", "tests/integration/test_multinode.py",
             "tests/integration/test_train_pretrain.py", "tests/integration/test_cluster_jobs.py"]
    items = [_Item(f) for f in files]
    c._schedule(items)
    assert [Path(str(i.path)).name for i in items] == [
        "test_cluster_jobs.py", "test_multinode.py", "test_cli.py", "test_train_pretrain.py", "test_eval_jobs.py"]
