"""The config of `jobs/index.py`: the collection, the stage-1 model, the FAISS index, Ray resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2_ray.config import require_input_and_output
from blip2_ray.config_fields import doc
from blip2_ray.data.config import DataConfig
from blip2_ray.runtime.compute import ComputeConfig


@dataclass
class IndexSection:
    """Which FAISS index holds the features (one vector per query token: Q per image)."""

    kind: Literal["auto", "flat", "ivfpq"] = doc(
        "flat: exact (the ITC ranking of the evaluation job, float32 vectors); ivfpq: compressed (IVF lists of "
        "4-bit fast-scan PQ codes, the best candidates re-scored exactly from the stored features); auto: flat "
        "up to exact_max_images images, ivfpq beyond", "auto")
    exact_max_images: int = doc("auto: the largest collection indexed exactly (flat keeps Q x embed_dim float32 "
                                "per image: 32 KiB at BLIP-2's 32 x 256)", 100_000, ge=0)
    nlist: int | None = doc("ivfpq: IVF lists (null: the power of two nearest sqrt(vectors) / 4, at most 256 "
                            "(each added vector is compared with every list on the driver), and at least 39 "
                            "training vectors per list); more lists: faster queries, slower building", None, ge=1)
    pq_m: int | None = doc("ivfpq: PQ sub-quantizers, 4 bits each (null: embed_dim / 8, i.e. 16 bytes per "
                           "vector at embed_dim 256); must divide embed_dim", None, ge=1)
    nprobe: int = doc("ivfpq: lists visited per query vector (the serving default; a request cannot change it)",
                      32, ge=1)
    refine_factor: int = doc("ivfpq: re-score the best refine_factor x k images by PQ exactly from the stored "
                             "features (0: PQ scores only; needs keep_features). Recall@10 at 1e5 synthetic images: "
                             "4 -> 0.78, 8 -> 0.985, 16 -> 1.0 (docs/search.md)", 16, ge=0)
    train_vectors: int = doc("ivfpq: vectors sampled (seeded) from the collection to train the IVF and PQ",
                             131_072, ge=1)
    keep_features: bool = doc("keep each shard's float32 features (OUT/shards/*.npy, 4 x Q x embed_dim bytes per "
                              "image): ivfpq re-scores from them, and a change of kind or a retrain rebuilds from "
                              "them", True)
    rebuild: bool = doc("build the index again from the stored features (e.g. to retrain an ivfpq index after "
                        "it grew a lot), instead of adding the new shards to it", False)
    use_gpu: Literal["auto", "never"] = doc("train and fill the FAISS index on GPUs when the driver sees them "
                                            "and FAISS was built with GPU support (faiss-gpu); the file is the same",
                                            "auto")

    def validate(self) -> None:
        if self.refine_factor and not self.keep_features:
            raise ValueError("refine_factor needs keep_features: true (it re-scores from the stored features); "
                             "set refine_factor: 0 to search the PQ codes alone")


@dataclass
class IndexComputeConfig(ComputeConfig):
    """The shared actor-pool section plus the ViT dtype and the decoding beside the model."""

    dtype: str = doc("ViT dtype: float32 | float16 | bfloat16 | auto (fp16 on GPU, fp32 on CPU); the evaluation "
                     "job's `compute.dtype` gives the same features", "auto")
    decode_ahead: int = doc("chunks of compute.batch_size images an actor decodes ahead on a second thread while "
                            "its model runs (0: decode, then compute, in turn)", 2, ge=0)


@dataclass
class IndexJobConfig:
    input: list[str] = doc("image shards: files, directories, globs or s3:// URIs (img2dataset tars or parquet)",
                           factory=list)
    output_dir: str = doc("the index directory (local); a rerun adds the shards not indexed yet", "")
    model: str = doc("a stage-1 export / Blip2ForImageTextRetrieval directory: its ITC features are indexed, and "
                     "the server must serve the same model", "")
    index: IndexSection = doc("the FAISS index", factory=IndexSection)
    compute: IndexComputeConfig = doc("Ray actor pool (one shard per call)", factory=IndexComputeConfig)
    data: DataConfig = doc("record reading and image checks (image_keys, caption_keys, min_image_side, s3_*); "
                           "images are resized to the model's input size", factory=DataConfig)
    summary_file: str | None = doc("where the JSON summary goes (default: OUTPUT_DIR/index_summary.json)", None)

    def validate(self) -> None:
        require_input_and_output(self)
        if not self.model:
            raise ValueError("model must name a stage-1 export directory")
