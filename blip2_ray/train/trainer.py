"""Driver side of pre-training: check inputs, build the Ray dataset, run the TorchTrainer.

`run_pretrain(cfg)` is what `blip2-ray pretrain` (and the tests, and the benchmark) call once Ray is up.
"""

from __future__ import annotations

import os

from blip2_ray.config import to_dict
from blip2_ray.errors import UserError
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.tasks import task_of


def check_inputs(cfg: PretrainConfig) -> list[str]:
    """Fail with one sentence before any worker starts: data paths, weight sources, the task's own checks,
    the tokenizers of the batch's columns.

    Returns the training shard files.
    """
    from blip2_ray.data.pipeline import resolve_sources
    from blip2_ray.weights.weight_sources import check_weight_sources

    if not cfg.data.train:
        raise UserError("data.train is empty; name the training shards, e.g. --set data.train='[shards/]'")
    files = resolve_sources(cfg.data.train, cfg.data)
    if not files:
        raise UserError(f"data.train {cfg.data.train} holds no .tar or .parquet shard")
    check_weight_sources(cfg.model, cfg.stage)  # kinds, sizes, contradictions, no accidental random init
    task = task_of(cfg)
    task.check_inputs(cfg)
    task.tokenizer_dirs(cfg)
    return files


def build_train_dataset(cfg: PretrainConfig):
    """The run's training dataset, its epoch read from the run's EpochPlan (created here, held by the driver)."""
    from blip2_ray.data.epoch_plan import epoch_plan_name
    from blip2_ray.data.pipeline import build_dataset
    from blip2_ray.weights.llm_source import llm_family

    qtok, ltok = task_of(cfg).tokenizer_dirs(cfg)  # the token columns the task's batches hold
    return build_dataset(cfg.data, cfg.data.train, train=True, qformer_tokenizer=qtok, llm_tokenizer=ltok,
                         plan_name=epoch_plan_name(cfg.run_name), llm_family=llm_family(cfg.model) if ltok else None)


def run_config(cfg: PretrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    storage_path, fs = cfg.local_storage_path, None
    if cfg.is_s3:
        storage_path = cfg.storage_path
        if cfg.storage_endpoint_url:
            import pyarrow.fs

            # credentials in the driver's environment go along (the workers write with the driver's identity,
            # as the data pipeline reads); without them each worker uses its own AWS chain
            keys = {}
            if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
                keys = {"access_key": os.environ["AWS_ACCESS_KEY_ID"],
                        "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                        "session_token": os.environ.get("AWS_SESSION_TOKEN")}
            fs = pyarrow.fs.S3FileSystem(endpoint_override=cfg.storage_endpoint_url, **keys)
            storage_path = cfg.storage_path.removeprefix("s3://")
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return RunConfig(
        name=cfg.run_name,
        storage_path=storage_path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": env},
        # Train's own INFO lines (every report's metrics dict, each checkpoint's path) are not for the console:
        # the workers print one progress line per logging window; warnings still show
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def state_api_answers() -> bool:
    """Whether the connected cluster's State API (served by its dashboard) answers; not on an instance started
    without a dashboard. Asked at this cluster's own address: with no address the State API looks for *a* Ray
    instance and fails where several run on the machine. A probe that fails otherwise counts as an answer (Ray's
    default stays)."""
    import ray
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=5, raise_on_missing_output=False)
    except RayStateApiException:
        return False
    except Exception:  # noqa: BLE001 - not a verdict on the State API: keep Ray's default
        pass
    return True


def torch_trainer_class():
    """TorchTrainer, less its placement-group cleaner where the cluster's State API does not answer.

    The cleaner (a detached actor of every run) asks the State API each second whether the run's controller lives,
    to remove the run's placement group if the controller died without doing so. Without a dashboard (the demo's and
    the tests' local instances) the question always fails: the cleaner could never act, yet it cost a process per
    run and printed a warning each second (170 of the demo's 267 lines). Where the dashboard runs (`ray start
    --head`, cluster.yaml) it stays.
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if state_api_answers():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    Trainer.__name__ = Trainer.__qualname__ = "TorchTrainer"
    return Trainer


def ingest_config(data_cfg):
    """Ray Train's data ingest settings of a run: Ray Train's own, or with `data.preserve_order` its default
    options (this process's DataContext) preserving the order (the rows in file-visit order, not in the order the
    decode tasks finish)."""
    from ray.train import DataConfig as IngestConfig

    if not data_cfg.preserve_order:
        return IngestConfig()
    options = IngestConfig.default_ingest_options()
    options.preserve_order = True
    return IngestConfig(execution_options=options)


def build_trainer(cfg: PretrainConfig, dataset=None):
    """The TorchTrainer of a run (`dataset`: the training Ray Dataset, built from cfg.data when None)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    from blip2_ray.train.loop import train_loop_per_worker

    return torch_trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "config_class": type(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=run_config(cfg),
        datasets={"train": dataset if dataset is not None else build_train_dataset(cfg)},
        dataset_config=ingest_config(cfg.data),
    )


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local paths made absolute on the driver: workers and data tasks run in other directories."""
    import copy

    def fix(p: str | None) -> str | None:
        return p if p is None or "://" in p else os.path.abspath(os.path.expanduser(p))

    cfg = copy.deepcopy(cfg)
    cfg.output_dir = fix(cfg.output_dir)
    cfg.tensorboard_dir = cfg.tensorboard_path
    cfg.data.train = [fix(p) for p in cfg.data.train]
    cfg.data.eval = [fix(p) for p in cfg.data.eval]
    m = cfg.model
    m.init_from, m.hf_path, m.vision.path, m.llm.path = map(fix, (m.init_from, m.hf_path, m.vision.path, m.llm.path))
    m.qformer.init_from_bert = fix(m.qformer.init_from_bert)
    if not cfg.is_s3:
        cfg.storage_path = cfg.local_storage_path
    if cfg.fault_injection.pid_dir:
        cfg.fault_injection.pid_dir = fix(cfg.fault_injection.pid_dir)
    return cfg


class TrainingWarning(UserWarning):
    """A setting that trains differently from the paper (said once per run, at start)."""


def run_pretrain(cfg: PretrainConfig, dataset=None):
    """Check inputs and cluster resources, train (resuming the run's latest checkpoint if any), export.

    Returns the ray.train Result. A worker that stopped for a data stall raises its DataStallError here.
    """
    import warnings

    from ray.train import TrainingFailedError

    from blip2_ray.data.epoch_plan import epoch_plan_name, release_epoch_plan
    from blip2_ray.train.resources import check_cluster

    cfg = absolute_paths(cfg)
    check_inputs(cfg)
    check_cluster(cfg)
    for message in cfg.start_warnings():
        warnings.warn(message, TrainingWarning, stacklevel=2)
    try:
        return build_trainer(cfg, dataset).fit()
    except TrainingFailedError as e:
        stall = data_stall_of(e)
        if stall is not None:
            raise stall from None
        raise
    finally:
        release_epoch_plan(epoch_plan_name(cfg.run_name))


def data_stall_of(error: BaseException):
    """The DataStallError a worker raised inside a Ray Train failure, or None."""
    from blip2_ray.train.batches import DataStallError

    for failure in getattr(error, "worker_failures", {}).values():
        cause = failure
        for _ in range(8):  # RayTaskError -> its cause -> ...
            if cause is None:
                break
            if isinstance(cause, DataStallError):
                return DataStallError(str(cause.args[0]) if cause.args else str(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def read_train_state(checkpoint) -> dict:
    """The step/epoch/start-steps record inside a checkpoint of this trainer."""
    import json

    from blip2_ray.train.checkpoints import STATE_FILE

    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            return json.load(f)
