"""The `data` section of a job's config: where the shards are and how records become batches."""

from __future__ import annotations

from dataclasses import dataclass

from blip2_ray.config_fields import doc


@dataclass
class DataConfig:
    train: list[str] = doc("training sources: files, directories, globs or s3://bucket/prefix URIs of "
                           "WebDataset tars or parquet files (img2dataset output)", factory=list)
    weights: list[float] | None = doc("per-source sampling weights for `train` (one per source); None visits "
                                      "every file of every source once per epoch", None)
    eval: list[str] = doc("evaluation sources (same forms as `train`)", factory=list)
    image_keys: list[str] = doc("tar member extensions / parquet columns holding the image, first match wins",
                                factory=lambda: ["jpg", "png", "webp", "image"])
    caption_keys: list[str] = doc("tar member extensions / parquet columns holding the caption (text, or a "
                                  "JSON list of captions: one is drawn per visit)", factory=lambda: ["txt", "caption"])
    image_size: int = doc("side of the square model input, pixels", 224, ge=1)
    min_crop_scale: float = doc("RandomResizedCrop minimum area fraction", 0.5, gt=0, le=1)
    min_image_side: int = doc("images with a shorter side are skipped", 32, ge=1)
    max_image_pixels: int = doc("images with more pixels are skipped (decompression bombs)", 89_478_485, ge=1)
    max_caption_words: int = doc("cleaned captions are cut to this many words", 50, ge=1)
    qformer_max_len: int = doc("Q-Former (BERT) token length, padded", 32, ge=1)
    llm_max_len: int = doc("LLM token length, right padded", 32, ge=1)
    vqa_prompt: str = doc("VQA rows (shards with a `question` column): the prompt the question is written into, "
                          "read by the question-aware Q-Former and the LLM; BLIP-2's: decoders 'Question: {} "
                          "Answer:', FlanT5 'Question: {} Short answer:' (blip2-ray finetune picks it by LLM)",
                          "Question: {} Answer:")
    shuffle_buffer: int = doc("local shuffle buffer (rows) per Train worker", 1000, ge=0)
    seed: int = doc("seed of shard order, crops, flips and caption draws", 0)
    decode_batch_size: int = doc("rows per decode/transform/tokenise batch", 32, ge=1)
    decode_concurrency: int | None = doc("max parallel read+decode tasks; None lets Ray Data decide", None, ge=1)
    preserve_order: bool = doc("training rows reach the workers in the epoch's file-visit order, whichever read+decode "
                               "task finishes first: with a seed, a run trains on the same batches each time (its "
                               "learning curve repeats); a fast task's rows may wait for a slow one's", False)
    num_cpus_per_decode_task: float = doc("CPUs reserved per decode task", 1.0, gt=0)
    output_block_mib: float = doc("target size (MiB) of the blocks the read+decode stage emits: rows stream out "
                                  "while a shard is still decoding (Ray Data's default, 128, holds up to 128 MiB "
                                  "of a shard's rows before the first leaves)", 8.0, gt=0)
    prefetch_batches: int = doc("batches prefetched by each Train worker", 2, ge=1)
    stall_timeout_s: float = doc("a training worker that receives no batch for this long stops the run with a "
                                 "diagnosis (what it waited for, the cluster's used and free resources); 0: wait "
                                 "forever. Counted as a worker failure: failure.max_failures restarts apply",
                                 600.0, ge=0)
    s3_endpoint_url: str | None = doc("S3-compatible endpoint (MinIO, moto...); None uses AWS_ENDPOINT_URL or AWS",
                                      None)
    s3_region: str | None = doc("S3 region; None uses the AWS default chain", None)
    s3_anonymous: bool = doc("read public buckets without credentials", False)

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
        if self.vqa_prompt.count("{}") != 1:
            raise ValueError(f"vqa_prompt must hold one {{}} for the question, got {self.vqa_prompt!r}")
        if self.min_image_side * self.min_image_side > self.max_image_pixels:
            raise ValueError("min_image_side squared exceeds max_image_pixels: every image would be skipped")
