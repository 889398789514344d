"""The config of `jobs/capfilt.py`: inputs, models, sampling, filtering, Ray resources."""

from __future__ import annotations

from dataclasses import dataclass

from blip2_ray.config import doc
from blip2_ray.data.config import DataConfig
from blip2_ray.runtime.compute import ComputeConfig


@dataclass
class CaptionerConfig:
    model: str = doc("stage-2 export directory (Blip2ForConditionalGeneration + tokenizer) that writes captions", "")
    num_captions: int = doc("synthetic captions per image (nucleus sampling)", 10)
    top_p: float = doc("nucleus sampling mass", 0.9)
    temperature: float = doc("sampling temperature", 1.0)
    max_new_tokens: int = doc("longest synthetic caption, tokens", 30)
    min_new_tokens: int = doc("shortest synthetic caption, tokens", 5)
    prompt: str = doc("text prompt before the caption (e.g. 'a photo of'); '' for none", "")
    prepend_prompt: bool = doc("keep the prompt at the start of the synthetic caption", True)
    dtype: str = doc("float32 | float16 | bfloat16 | auto (fp16 ViT/LLM on GPU, fp32 on CPU)", "auto")

    def validate(self) -> None:
        if self.num_captions < 0:
            raise ValueError(f"num_captions must be >= 0, got {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError("need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1")


@dataclass
class FilterConfig:
    model: str = doc("stage-1 export (or Blip2ForImageTextRetrieval) directory that scores captions by ITC", "")
    keep: int = doc("captions kept per image (the best by ITC similarity, web and synthetic together)", 2)
    dtype: str = doc("ViT dtype: float32 | float16 | bfloat16 | auto (fp16 on GPU, fp32 on CPU)", "auto")

    def validate(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


@dataclass
class CapFiltComputeConfig(ComputeConfig):
    """The shared actor-pool section with CapFilt's defaults (an actor holds both models)."""

    num_actors: int = doc("actors in the pool (each holds both models; one GPU each where GPUs exist)", 2)
    batch_size: int = doc("images per model call inside an actor", 16)


@dataclass
class CapFiltConfig:
    input: list[str] = doc("input shards: files, directories, globs or s3:// URIs (tar or parquet)", factory=list)
    output_dir: str = doc("local directory for the output shards (same file names and format as the input)", "")
    captioner: CaptionerConfig = doc("the model that writes synthetic captions", factory=CaptionerConfig)
    filter: FilterConfig = doc("the model that ranks captions", factory=FilterConfig)
    compute: CapFiltComputeConfig = doc("Ray actor pool", factory=CapFiltComputeConfig)
    data: DataConfig = doc("record decoding and checks (image_keys, caption_keys, min_image_side, ...)",
                           factory=DataConfig)
    seed: int = doc("seed of the caption sampling (per shard)", 0)
    summary_file: str | None = doc("where the JSON summary goes (default: OUTPUT_DIR/capfilt_summary.json)", None)

    def validate(self) -> None:
        if not self.input:
            raise ValueError("input must name at least one source")
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        if not self.filter.model:
            raise ValueError("filter.model must name a stage-1 export directory")
        if self.captioner.num_captions > 0 and not self.captioner.model:
            raise ValueError("captioner.model must name a stage-2 export directory (or set captioner.num_captions=0)")
