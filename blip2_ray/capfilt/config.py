"""The config of `blip2-ray capfilt`: inputs, models, sampling, filtering, Ray resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2_ray.config import require_input_and_output
from blip2_ray.config_fields import doc
from blip2_ray.data.config import DataConfig
from blip2_ray.runtime.compute import ComputeConfig

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass
class CaptionerConfig:
    kind: Literal["blip2", "blip"] = doc(
        "blip2: a stage-2 export / Blip2ForConditionalGeneration directory; blip: a BlipForConditionalGeneration "
        "+ BlipProcessor directory (e.g. Salesforce/blip-image-captioning-large, the paper's captioner)", "blip2")
    model: str = doc("the captioner's local model directory (of the `kind` above)", "")
    num_captions: int = doc("synthetic captions per image (nucleus sampling)", 10, ge=0)
    top_p: float = doc("nucleus sampling mass", 0.9, gt=0, le=1)
    temperature: float = doc("sampling temperature", 1.0, gt=0)
    repetition_penalty: float = doc("HF generate's repetition penalty (1.0: none; BLIP's own sampling uses 1.1)",
                                    1.0, gt=0)
    max_new_tokens: int = doc("longest synthetic caption, tokens", 30, ge=1)
    min_new_tokens: int = doc("shortest synthetic caption, tokens", 5, ge=0)
    prompt: str = doc("text the caption continues (blip2: 'a photo of', blip: 'a picture of'); '' for none "
                      "(blip: unconditional, the decoder starts from [DEC] alone)", "")
    prepend_prompt: bool = doc("keep the prompt at the start of the synthetic caption", True)
    dtype: Dtype = doc("auto: fp16 on GPU, fp32 on CPU", "auto")

    def validate(self) -> None:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")


@dataclass
class FilterConfig:
    kind: Literal["blip2_itc", "clip"] = doc(
        "blip2_itc: a stage-1 export / Blip2ForImageTextRetrieval directory, ranked by ITC similarity (max over "
        "queries); clip: a CLIPModel + CLIPProcessor directory (e.g. openai/clip-vit-large-patch14, the paper's "
        "filter), ranked by CLIP's logits_per_image; captions past the text limit are truncated and counted",
        "blip2_itc")
    model: str = doc("the filter's local model directory (of the `kind` above)", "")
    keep: int = doc("captions kept per image (the best by the filter's score, web and synthetic together)", 2, ge=1)
    dtype: Dtype = doc("auto: fp16 on GPU, fp32 on CPU (blip2_itc: the ViT's dtype)", "auto")


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
        require_input_and_output(self)
        filter_dir = {"blip2_itc": "a stage-1 export", "clip": "a CLIPModel"}[self.filter.kind]
        if not self.filter.model:
            raise ValueError(f"filter.model must name {filter_dir} directory (filter.kind={self.filter.kind})")
        caption_dir = {"blip2": "a stage-2 export", "blip": "a BlipForConditionalGeneration"}[self.captioner.kind]
        if self.captioner.num_captions > 0 and not self.captioner.model:
            raise ValueError(f"captioner.model must name {caption_dir} directory (captioner.kind="
                             f"{self.captioner.kind}), or set captioner.num_captions=0")
