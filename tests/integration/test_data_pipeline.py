"""The Ray Data pipeline end to end: local and S3 shards, exact skip counts, the data check, Ray Train."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from blip2_ray.data.config import DataConfig
from blip2_ray.errors import UserError
from blip2_ray.fixtures.sample import CORRUPT_KINDS, make_sample_shards

REPO = Path(__file__).resolve().parents[2]
ALL = {k: 1 for k in CORRUPT_KINDS}
GOOD = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """{fmt: (dir, summary)}: GOOD good records + one of every corruption kind, over 3 shards."""
    out = {}
    for fmt in ("webdataset", "parquet"):
        d = tmp_path_factory.mktemp(fmt)
        corrupt = {k: v for k, v in ALL.items() if not (fmt == "parquet" and k == "truncated_tar")}
        out[fmt] = (str(d), make_sample_shards(str(d), fmt=fmt, num=GOOD, shards=3, image_size=48,
                                               corrupt=corrupt, seed=1))
    return out


def _collect(ds):
    keys, rows = [], None
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        keys.extend(batch["key"].tolist())
        rows = rows or batch
    return keys, rows


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_local_shards_exact_rows_and_skip_counts(ray_session, shards, tiny_tokenizers, fmt):
    from blip2_ray.data.pipeline import build_dataset
    from blip2_ray.data.skips import get_skip_counts

    d, summary = shards[fmt]
    cfg = DataConfig(image_size=32, qformer_max_len=16, llm_max_len=16)
    tag = f"local-{fmt}"
    ds = build_dataset(cfg, [d], train=True, qformer_tokenizer=tiny_tokenizers["qformer"],
                       llm_tokenizer=tiny_tokenizers["opt"], llm_family="opt", skip_tag=tag)
    keys, batch = _collect(ds)
    assert sorted(keys) == [f"{i:07d}" for i in range(GOOD)]
    assert get_skip_counts(tag) == summary["skipped"]
    assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["pixel_values"].dtype == np.uint8
    for col in ("qformer_input_ids", "qformer_attention_mask", "llm_input_ids", "llm_attention_mask"):
        assert batch[col].shape[1:] == (16,) and batch[col].dtype == np.int64
    assert all(isinstance(c, str) and c == c.lower() for c in batch["caption"])


def _decode_run(d, tiny_tokenizers, tag: str, **cfg) -> tuple[int, int]:
    """Stream the webdataset shards at `d` through the decode stage: (tasks executed, blocks produced)."""
    from blip2_ray.data.pipeline import build_dataset

    ds = build_dataset(DataConfig(image_size=32, decode_batch_size=4, **cfg), [d], train=True,
                       qformer_tokenizer=tiny_tokenizers["qformer"], llm_tokenizer=None, skip_tag=tag)
    keys, _ = _collect(ds)
    assert len(keys) == GOOD
    found = re.search(r"ReadEpochFiles: (\d+) tasks executed, (\d+) blocks produced", ds.stats())
    assert found, ds.stats()
    return int(found.group(1)), int(found.group(2))


def test_each_shard_file_is_its_own_task(ray_session, shards, tiny_tokenizers):
    """The files spread over the CPUs: one decode task per shard file (Ray Data once fused a read and a
    decode stage into one operator that bundled every file into a single task)."""
    d, summary = shards["webdataset"]
    tasks, _ = _decode_run(d, tiny_tokenizers, "per-file")
    assert tasks == len(summary["files"]) > 1


def test_rows_leave_a_decode_task_in_blocks_of_output_block_mib(ray_session, shards, tiny_tokenizers):
    """A shard's rows stream out in several blocks while it decodes, not as one block at the task's end."""
    d, summary = shards["webdataset"]
    # 0.01 MiB: about one decode batch of 4 rows at 32 px per block
    blocks = {mib: _decode_run(d, tiny_tokenizers, f"blocks-{mib}", output_block_mib=mib)[1] for mib in (0.01, 128.0)}
    assert blocks[128.0] == len(summary["files"])  # one block per file
    assert blocks[0.01] >= GOOD // 8 > blocks[128.0]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_s3_shards_through_a_real_s3_server(ray_session, shards, s3_server, fmt):
    from blip2_ray.data.pipeline import build_dataset, resolve_sources
    from blip2_ray.data.skips import get_skip_counts

    d, summary = shards[fmt]
    client, bucket = s3_server["client"], s3_server["bucket"]
    for f in sorted(os.listdir(d)):
        client.upload_file(os.path.join(d, f), bucket, f"{fmt}/{f}")
    cfg = DataConfig(image_size=32, s3_endpoint_url=s3_server["endpoint_url"])
    src = f"s3://{bucket}/{fmt}"
    assert len(resolve_sources([src], cfg)) == len(summary["files"])
    with pytest.raises(UserError, match="holds no"):
        resolve_sources([f"s3://{bucket}/nothing-here"], cfg)
    tag = f"s3-{fmt}"
    ds = build_dataset(cfg, [src], train=False, qformer_tokenizer=None, llm_tokenizer=None, skip_tag=tag)
    keys, batch = _collect(ds)
    assert sorted(keys) == [f"{i:07d}" for i in range(GOOD)]
    assert get_skip_counts(tag) == summary["skipped"]
    assert "qformer_input_ids" not in batch and "llm_input_ids" not in batch


def test_check_data_cli_reports_counts_as_json(ray_session, shards, job_main, capsys):
    """The job on the session's cluster (which it leaves running); its bad inputs: tests/unit/test_job_cli_errors."""
    import ray

    d, summary = shards["webdataset"]
    capsys.readouterr()
    assert job_main("check_data")([d, "--json", "--address", ray_session]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"ok": GOOD, "skipped": dict(sorted(summary["skipped"].items())), "files": len(summary["files"])}
    assert ray.is_initialized()


def _train_loop(config):
    import ray.train

    from blip2_ray.config import from_dict
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.pipeline import iter_train_batches
    from blip2_ray.data.skips import get_skip_counts

    cfg = from_dict(DataConfig, config["data"])
    shard = ray.train.get_dataset_shard("train")
    seen, sizes = [], []
    for batch in iter_train_batches(shard, config["batch_size"], cfg):
        sizes.append(int(batch["pixel_values"].shape[0]))
        assert batch["qformer_input_ids"].dtype.is_floating_point is False
        seen.extend(batch["key"])
    rank = ray.train.get_context().get_world_rank()
    skipped = get_skip_counts("trainer")  # what the training loop reports as metrics
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"keys": seen, "sizes": sizes, "skipped": skipped}))
    ray.train.report({"rows": len(seen), **{f"skipped/{k}": v for k, v in skipped.items()}})


def test_two_worker_torch_trainer_sees_every_good_record_once(ray_session, shards, tiny_tokenizers, tmp_path):
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchConfig

    from blip2_ray.config import to_dict
    from blip2_ray.data.pipeline import build_dataset
    from blip2_ray.train.trainer import torch_trainer_class  # the project's: no idle placement-group cleaner

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    d, _ = shards["webdataset"]
    cfg = DataConfig(image_size=32, shuffle_buffer=8, qformer_max_len=16, llm_max_len=16)
    ds = build_dataset(cfg, [d], train=True, qformer_tokenizer=tiny_tokenizers["qformer"],
                       llm_tokenizer=tiny_tokenizers["t5"], skip_tag="trainer")
    out = tmp_path / "seen"
    out.mkdir()
    trainer = torch_trainer_class()(
        _train_loop,
        train_loop_config={"data": to_dict(cfg), "batch_size": 8, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="data-test", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
    )
    result = trainer.fit()
    assert result.error is None
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(s == 8 for r in ranks for s in r["sizes"])  # fixed-size batches on every rank
    assert len(ranks[0]["sizes"]) == len(ranks[1]["sizes"]) == GOOD // 16
    union = ranks[0]["keys"] + ranks[1]["keys"]
    assert sorted(union) == [f"{i:07d}" for i in range(GOOD)]  # each good record once
    assert ranks[0]["skipped"] == shards["webdataset"][1]["skipped"]  # counts readable from a Train worker


def _epoch_rows(ds, plan, epoch: int, consumed=(), partial=None) -> dict:
    """key -> (pixel bytes, caption, visit, record) of one execution of `ds` planned for `epoch`."""
    import ray

    ray.get(plan.begin.remote(epoch, list(consumed), partial or {}))
    rows = {}
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        for i, k in enumerate(b["key"]):
            rows[str(k)] = (b["pixel_values"][i].tobytes(), str(b["caption"][i]), int(b["visit"][i]),
                            int(b["record"][i]))
    return rows


def test_each_epoch_draws_afresh_and_a_resumed_epoch_reads_only_what_is_due(ray_session, tmp_path):
    """Per-epoch randomness through the EpochPlan: epoch 1 crops, flips and draws captions anew, the same
    epoch again gives the same rows, and a resume of that epoch (a consumed visit, a half-trained one)
    yields exactly the rows not trained yet, identical to the first pass, decoding nothing else."""
    import ray

    from blip2_ray.data.epoch_plan import epoch_plan, pack_records
    from blip2_ray.data.pipeline import build_dataset

    d = tmp_path / "multi"
    make_sample_shards(str(d), num=24, shards=3, image_size=48, num_captions=3, seed=2)
    ds = build_dataset(DataConfig(image_size=32, min_crop_scale=0.5, decode_batch_size=4), [str(d)], train=True,
                       qformer_tokenizer=None, llm_tokenizer=None, skip_tag="epochs", plan_name="epochs-test")
    plan = epoch_plan("epochs-test")
    e0, e1, e0_again = _epoch_rows(ds, plan, 0), _epoch_rows(ds, plan, 1), _epoch_rows(ds, plan, 0)
    assert len(e0) == len(e1) == 24 and e0 == e0_again  # reproducible for the same seed and epoch
    assert sum(e0[k][0] != e1[k][0] for k in e0) >= 20  # new crops / flips
    assert sum(e0[k][1] != e1[k][1] for k in e0) >= 6  # a new caption drawn from the 3 of each record
    visit_files = lambda rows: {v: sorted(k for k, r in rows.items() if r[2] == v) for v in range(3)}  # noqa: E731
    assert visit_files(e0) != visit_files(e1)  # a new file order
    assert ray.get(plan.good_records.remote(0)) == {v: len(ks) for v, ks in visit_files(e0).items()}

    # resume epoch 0: visit 0 fully trained, visit 1 trained at its even-numbered records
    trained = [r[3] for r in e0.values() if r[2] == 1 and r[3] % 2 == 0]
    before = ray.get(plan.generation.remote())
    resumed = _epoch_rows(ds, plan, 0, consumed=[0], partial={1: pack_records(trained)})
    due = {k: r for k, r in e0.items() if r[2] == 2 or (r[2] == 1 and r[3] not in trained)}
    assert resumed == due  # the same rows as the first pass, none trained twice, none lost
    assert ray.get(plan.decoded_records.remote(0, before)) == len(due)  # visit 0 unread, trained records undecoded
