"""The `data` section of a job's config: where the shards are and how records become batches."""

from __future__ import annotations

from dataclasses import dataclass, field


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass
class DataConfig:
    train: list[str] = field(
        default_factory=list,
        metadata=_doc("training sources: files, directories, globs or s3://bucket/prefix URIs of "
                      "WebDataset tars or parquet files (img2dataset output)"),
    )
    weights: list[float] | None = field(
        default=None,
        metadata=_doc("per-source sampling weights for `train` (one per source); None visits every "
                      "file of every source once per epoch"),
    )
    eval: list[str] = field(default_factory=list, metadata=_doc("evaluation sources (same forms as `train`)"))
    image_keys: list[str] = field(
        default_factory=lambda: ["jpg", "png", "webp", "image"],
        metadata=_doc("tar member extensions / parquet columns holding the image, first match wins"),
    )
    caption_keys: list[str] = field(
        default_factory=lambda: ["txt", "caption"],
        metadata=_doc("tar member extensions / parquet columns holding the caption (text, or a JSON "
                      "list of captions: one is drawn per visit)"),
    )
    image_size: int = field(default=224, metadata=_doc("side of the square model input, pixels"))
    min_crop_scale: float = field(default=0.5, metadata=_doc("RandomResizedCrop minimum area fraction"))
    min_image_side: int = field(default=32, metadata=_doc("images with a shorter side are skipped"))
    max_image_pixels: int = field(
        default=89_478_485, metadata=_doc("images with more pixels are skipped (decompression bombs)")
    )
    max_caption_words: int = field(default=50, metadata=_doc("cleaned captions are cut to this many words"))
    qformer_max_len: int = field(default=32, metadata=_doc("Q-Former (BERT) token length, padded"))
    llm_max_len: int = field(default=32, metadata=_doc("LLM token length, right padded"))
    shuffle_buffer: int = field(default=1000, metadata=_doc("local shuffle buffer (rows) per Train worker"))
    seed: int = field(default=0, metadata=_doc("seed of shard order, crops, flips and caption draws"))
    decode_batch_size: int = field(default=32, metadata=_doc("rows per decode/transform/tokenise batch"))
    decode_concurrency: int | None = field(
        default=None, metadata=_doc("max parallel read+decode tasks; None lets Ray Data decide")
    )
    num_cpus_per_decode_task: float = field(default=1.0, metadata=_doc("CPUs reserved per decode task"))
    prefetch_batches: int = field(default=2, metadata=_doc("batches prefetched by each Train worker"))
    s3_endpoint_url: str | None = field(
        default=None, metadata=_doc("S3-compatible endpoint (MinIO, moto...); None uses AWS_ENDPOINT_URL or AWS")
    )
    s3_region: str | None = field(default=None, metadata=_doc("S3 region; None uses the AWS default chain"))
    s3_anonymous: bool = field(default=False, metadata=_doc("read public buckets without credentials"))

    def validate(self) -> None:
        if self.weights is not None:
            if len(self.weights) != len(self.train):
                raise ValueError(f"weights has {len(self.weights)} values but train has {len(self.train)} sources")
            if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
                raise ValueError("weights must be >= 0 with at least one > 0")
        if not self.image_keys:
            raise ValueError("image_keys must name at least one key")
        if not self.caption_keys:
            raise ValueError("caption_keys must name at least one key")
        for name in ("image_size", "min_image_side", "max_image_pixels", "max_caption_words",
                     "qformer_max_len", "llm_max_len", "decode_batch_size", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if self.min_image_side * self.min_image_side > self.max_image_pixels:
            raise ValueError("min_image_side squared exceeds max_image_pixels: every image would be skipped")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.decode_concurrency is not None and self.decode_concurrency < 1:
            raise ValueError(f"decode_concurrency must be >= 1 or null, got {self.decode_concurrency}")
        if self.num_cpus_per_decode_task <= 0:
            raise ValueError(f"num_cpus_per_decode_task must be > 0, got {self.num_cpus_per_decode_task}")
