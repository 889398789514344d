"""The `blip2-ray pretrain` config: one typed tree, each component reading only its own section.

Derived values (gradient accumulation, the stage's default minimum lr, the Ray run directory) are
properties of `PretrainConfig`, computed here and nowhere else. The worker rebuilds the whole tree
from `to_dict(cfg)` (the `train_loop_config`), so every check below also runs inside Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2_ray.config_fields import doc
from blip2_ray.data.config import DataConfig
from blip2_ray.model.config import ModelConfig


@dataclass
class TrainConfig:
    max_steps: int = doc("optimizer steps of the whole run (a resumed run continues to this many)", 250_000, ge=1)
    global_batch_size: int = doc("samples per optimizer step over all workers", 1680, ge=1)
    micro_batch_size: int = doc("samples per forward/backward on one worker", 105, ge=1)
    lr: float = doc("peak learning rate", 1e-4, gt=0)
    min_lr: float | None = doc("cosine floor; None: the paper's 1e-5 (stage 1) / 5e-5 (stage 2)", None, ge=0)
    warmup_steps: int = doc("linear warmup steps from 0 to lr", 2000, ge=0)
    warmup_start_lr: float = doc("lr at step 0 of the warmup", 1e-6)
    weight_decay: float = doc("AdamW weight decay (not on biases, norms, queries, temperature)", 0.05, ge=0)
    betas: list[float] = doc("AdamW betas (paper 0.9, 0.98; reference config 0.9, 0.999)", factory=lambda: [0.9, 0.98])
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("gradient-norm clipping (0: off)", 0.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = doc(
        "autocast dtype of the trainable parts; trainable weights stay fp32 (the masters), the frozen ViT/LLM "
        "compute in their own dtype, ln_vision and the ITC/ITM/ITG logits in fp32 (docs/training.md); fp16 adds "
        "loss scaling", "bf16")
    seed: int = doc("seed of the model init (frozen random parts must match across ranks and restarts)", 42)
    log_every: int = doc("report metrics and print a progress line every N steps", 10, ge=1)
    checkpoint_every: int = doc("save a resumable checkpoint every N steps (and at the end)", 1000, ge=1)
    keep_checkpoints: int = doc("checkpoints kept in storage (the latest N)", 2, ge=1)
    compile: bool | None = doc(
        "regional torch.compile of the step (model/compile.py): each ViT block, Q-Former layer and LLM layer, the "
        "LM head and the stage-1 objectives, compiled before the first step (docs/training.md); null: on with GPUs "
        "(scaling.use_gpu), off on CPU workers. Where compiling fails the run trains eagerly after one warning", None)
    compile_time_limit_s: float = doc(
        "seconds compiling may take at start: past it the run says so, finishes the compile in progress and "
        "compiles nothing more (those parts run eagerly); 0: no limit", 900.0, ge=0)
    compile_backend: Literal["inductor", "aot_eager"] = doc(
        "inductor: generated kernels (the point of compiling); aot_eager: traced and differentiated ahead of time "
        "without generated code (quick to compile: tests, debugging)", "inductor")

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must be in [0, lr={self.lr}]")


@dataclass
class ScalingSection:
    num_workers: int = doc("Ray Train workers (one GPU each with use_gpu)", 2, ge=1)
    use_gpu: bool = doc("one GPU per worker and NCCL; false: CPU workers and gloo", False)
    cpus_per_worker: float = doc("CPUs reserved per training worker (the job checks at start that the workers "
                                 "and one data decode task fit the cluster together)", 1.0, gt=0)
    resource_wait_s: float = doc("seconds the start-up resource check waits for an autoscaling cluster to add the "
                                 "nodes the run needs (it asks the autoscaler for them); 0: check the nodes up now "
                                 "and fail in seconds if they cannot hold the run", 0.0, ge=0)


@dataclass
class DeepSpeedSection:
    zero_stage: int = doc("ZeRO stage: 2 (shard optimizer state + gradients) or 3 (+ all parameters, "
                          "frozen ViT/LLM included)", 2)
    stage3_param_persistence_threshold: int = doc(
        "ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's default 1e5)", 100_000, ge=0)
    stage3_max_live_parameters: int = doc(
        "ZeRO-3: most parameter elements held gathered at once, also the reuse distance within which a gathered "
        "parameter is kept (DeepSpeed's default 1e9 keeps ~2 GB of a bf16 ViT/LLM whole on every worker; 1e7 is "
        "about one ViT-g / OPT-2.7B block's largest weights)", 10_000_000, ge=1)
    stage3_prefetch_bucket_size: int = doc("ZeRO-3: parameter elements gathered ahead of the module that needs them",
                                           10_000_000, ge=0)
    stage3_sub_group_size: int = doc(
        "ZeRO-3: trainable parameter elements per optimizer sub-group; each sub-group's step holds float32 "
        "temporaries of ~3x its partition (the flattened gradient, AdamW's), so DeepSpeed's default 1e9 (the whole "
        "Q-Former in one group) adds ~0.6 GiB per worker at every step", 10_000_000, ge=1)
    overlap_comm: bool = doc("overlap gradient reduction with backward", False)
    reduce_bucket_size: int = doc("elements per gradient-reduction bucket", 50_000_000, ge=1)
    contiguous_gradients: bool | None = doc(
        "copy gradients into one contiguous buffer as they are reduced (less fragmentation on GPUs); "
        "null: on with 2+ workers, off with 1, where there is nothing to reduce and the copy costs ~2% of "
        "a step (bench/bench_ds_step.py), and off for ZeRO-3 on CPU, where the buffer (reduce_bucket_size "
        "float32 elements, 190 MiB) stays allocated through every forward and ZeRO-3 flattens each bucket again "
        "before reducing it", None)

    def validate(self) -> None:
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage}")


@dataclass
class FailureSection:
    max_failures: int = doc("worker-group restarts from the latest checkpoint after a crash (-1: unlimited)", 3, ge=-1)


@dataclass
class FaultInjection:
    """Test hooks: pause one worker at a step so a test can SIGKILL its process."""

    pid_dir: str | None = doc("directory the last rank writes `worker.pid` into (None: off)", None)
    at_step: int = doc("the step before which the pid is written (once per pid_dir)", 0)
    pause_s: float = doc("seconds the worker sleeps after writing its pid", 0.0)
    trained_keys_dir: str | None = doc("directory each rank appends a line per trained row to (run start step, step, "
                                       "epoch, key, CRC of its pixels); None: off", None)


@dataclass
class PretrainConfig:
    stage: int = doc("1: Q-Former representation learning (ITC+ITM+ITG); 2: generative learning with the LLM", 1)
    run_name: str = doc("Ray Train run name: a rerun with the same name resumes from its latest checkpoint",
                        "blip2_pretrain")
    output_dir: str = doc("final world-size-free HF export (stage 1: retrieval layout; stage 2: "
                          "Blip2ForConditionalGeneration + processor)", "outputs/blip2")
    storage_path: str = doc("checkpoints and logs: a local directory or s3://bucket/prefix", "~/ray_results")
    storage_endpoint_url: str | None = doc("S3-compatible endpoint for storage_path (MinIO...)", None)
    tensorboard_dir: str | None = doc("TensorBoard logs; None: <storage_path>/<run_name>/tensorboard when "
                                      "storage is local, else ./tensorboard/<run_name>", None)
    model: ModelConfig = doc("model sizes and weights", factory=ModelConfig)
    data: DataConfig = doc("training data", factory=DataConfig)
    train: TrainConfig = doc("optimisation and schedule", factory=TrainConfig)
    scaling: ScalingSection = doc("Ray Train workers", factory=ScalingSection)
    deepspeed: DeepSpeedSection = doc("DeepSpeed ZeRO", factory=DeepSpeedSection)
    failure: FailureSection = doc("fault tolerance", factory=FailureSection)
    fault_injection: FaultInjection = doc("test hooks (off by default)", factory=FaultInjection)

    STAGE1_INIT_FROM = False  # pre-training stage 1 starts its Q-Former from BERT, not from an export

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if self.data.image_size != self.model.vision.image_size:
            raise ValueError(f"data.image_size {self.data.image_size} differs from model.vision.image_size "
                             f"{self.model.vision.image_size}; set both to the same value")
        if self.stage == 1 and self.model.init_from and not self.STAGE1_INIT_FROM:
            raise ValueError("model.init_from is a stage-2 setting (a stage-1 export to start from)")
        if self.scaling.use_gpu is False and self.train.precision == "fp16":
            raise ValueError("train.precision fp16 needs GPUs; use fp32 (or bf16) on CPU workers")
        llm = self.model.llm
        if self.stage == 2 and llm.kind == "t5" and (llm.dtype == "float16" or self.train.precision == "fp16"):
            raise ValueError(f"FlanT5 overflows in float16 (model.llm.dtype {llm.dtype}, train.precision "
                             f"{self.train.precision}); use bf16 precision and a bfloat16 (or float32) LLM")
        _ = self.gradient_accumulation_steps  # raises when the batch sizes do not divide

    def start_warnings(self) -> list[str]:
        """What the job says once at start about settings that train differently from the paper."""
        out = []
        per_pass = self.train.micro_batch_size * self.scaling.num_workers
        if self.stage == 1 and self.gradient_accumulation_steps > 1:
            out.append(f"stage 1 with gradient accumulation {self.gradient_accumulation_steps}: ITC and ITM contrast "
                       f"each micro batch over the workers, {per_pass} samples (train.micro_batch_size "
                       f"{self.train.micro_batch_size} x {self.scaling.num_workers} workers), not the global batch "
                       f"of {self.train.global_batch_size} (the paper contrasts 1680 per step); raise "
                       f"train.micro_batch_size or scaling.num_workers for more negatives")
        if self.stage == 2 and self.train.precision == "bf16" and self.model.llm.dtype == "float16":
            out.append("stage 2 with bf16 autocast and a float16 LLM: gradients pass through the frozen LLM in "
                       "float16 without loss scaling and can underflow; use train.precision fp16 (loss scaling, "
                       "as the reference trains OPT) or a bfloat16 LLM")
        return out

    # ---- derived values: computed here only ----
    @property
    def task_name(self) -> str:
        """The task this config trains (train/tasks.TASKS): "stage1" or "stage2"."""
        return f"stage{self.stage}"

    @property
    def gradient_accumulation_steps(self) -> int:
        """global_batch_size / (micro_batch_size x num_workers); an error unless it is a whole number."""
        per_pass = self.train.micro_batch_size * self.scaling.num_workers
        if self.train.global_batch_size % per_pass:
            raise ValueError(
                f"train.global_batch_size {self.train.global_batch_size} is not a multiple of micro_batch_size "
                f"x num_workers = {self.train.micro_batch_size} x {self.scaling.num_workers}; change one of them")
        return self.train.global_batch_size // per_pass

    @property
    def compile_step(self) -> bool:
        """train.compile, else on with GPUs."""
        return self.scaling.use_gpu if self.train.compile is None else self.train.compile

    @property
    def min_lr(self) -> float:
        """train.min_lr, else the paper's floor for the stage (1e-5 stage 1, 5e-5 stage 2)."""
        if self.train.min_lr is not None:
            return self.train.min_lr
        return min(1e-5 if self.stage == 1 else 5e-5, self.train.lr)

    @property
    def is_s3(self) -> bool:
        return self.storage_path.startswith("s3://")

    @property
    def local_storage_path(self) -> str:
        import os

        return os.path.abspath(os.path.expanduser(self.storage_path))

    @property
    def tensorboard_path(self) -> str:
        import os

        if self.tensorboard_dir:
            return os.path.abspath(os.path.expanduser(self.tensorboard_dir))
        if self.is_s3:
            return os.path.abspath(os.path.join("tensorboard", self.run_name))
        return os.path.join(self.local_storage_path, self.run_name, "tensorboard")
