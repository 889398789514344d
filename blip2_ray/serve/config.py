"""The serving config: one typed, strictly validated section (unknown keys and wrong types are errors).

Loaded like every other job config (`load_config(ServeConfig, --config, --set)`), or from the `args`
mapping of a Serve config file (`app_builder(args)`), which goes through the same `from_dict` checks
because Serve itself accepts unknown keys silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from blip2_ray.config_fields import doc


@dataclass
class AutoscalingSection:
    min_replicas: int = doc("fewest model replicas", 1, ge=0)
    max_replicas: int = doc("most model replicas", 2)
    target_ongoing_requests: float = doc("ongoing requests per replica the autoscaler aims for", 8.0, gt=0)

    def validate(self) -> None:
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")


@dataclass
class IngressSection:
    """The HTTP ingress: auth, body parsing and image decoding + resizing (its CPU work) for every model replica."""

    num_replicas: int = doc("ingress replicas (ignored with autoscaling)", 1, ge=1)
    autoscaling: AutoscalingSection | None = doc("autoscale the ingress instead of num_replicas", None)
    cpus_per_replica: float = doc("CPUs reserved by each ingress replica (it decodes the images; the default "
                                  "lets caption + retrieval + ingress start on a 2-CPU machine)", 0.5, ge=0)
    max_ongoing_requests: int = doc("requests one ingress replica holds at once", 256, ge=1)


@dataclass
class RetrievalSection:
    """The retrieval deployment (/v1/embeddings, /v1/match): its own replicas, resources and batching."""

    num_replicas: int = doc("retrieval replicas (ignored with autoscaling)", 1, ge=1)
    autoscaling: AutoscalingSection | None = doc("autoscale the retrieval deployment instead of num_replicas", None)
    cpus_per_replica: float = doc("CPUs reserved by each retrieval replica", 0.5, ge=0)
    gpus_per_replica: float = doc("GPUs reserved by each retrieval replica when device is cuda (a fraction "
                                  "shares a GPU with the caption deployment)", 0.25, ge=0)
    max_batch_size: int = doc("most requests of one kind @serve.batch groups into one forward pass", 8, ge=1)
    batch_wait_timeout_s: float = doc("how long a retrieval batch waits to fill", 0.005, ge=0)
    max_ongoing_requests: int = doc("requests a retrieval replica holds at once (>= max_batch_size)", 32)
    max_queued_requests: int = doc("requests waiting for a retrieval replica before 503 (-1: unbounded)", 64, ge=-1)

    def validate(self) -> None:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"max_batch_size ({self.max_batch_size})")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or positive")


@dataclass
class SearchSection:
    """The search deployment (/v1/search): an index `jobs/index.py` built with `retrieval_model`."""

    index: str | None = doc("index directory written by blip2-ray index (needs retrieval_model: the model that "
                            "built it)", None)
    name: str | None = doc("the search model's name in /v1/models and responses (default: the index "
                           "directory's name)", None)
    default_k: int = doc("images returned when a request gives no k", 10, ge=1)
    max_k: int = doc("largest k a request may ask for", 100, ge=1)
    rerank_candidates: int = doc("k': text queries re-rank this many ITC candidates by ITM + ITC (the paper's "
                                 "k_test, 128)", 128, ge=1)
    max_candidates: int = doc("largest `candidates` a request may ask for", 512, ge=1)
    query_max_tokens: int = doc("Q-Former text length: longer queries are truncated (and the response says so)",
                                32, ge=1)
    itm_batch_size: int = doc("candidate images per ITM forward", 128, ge=1)
    nprobe: int | None = doc("IVF lists visited per query vector (null: the index's own setting)", None, ge=1)
    num_replicas: int = doc("search replicas (ignored with autoscaling)", 1, ge=1)
    autoscaling: AutoscalingSection | None = doc("autoscale the search deployment instead of num_replicas", None)
    cpus_per_replica: float = doc("CPUs reserved by each search replica (FAISS uses this many threads)", 0.5, ge=0)
    gpus_per_replica: float = doc("GPUs reserved by each search replica when device is cuda", 0.25, ge=0)
    max_ongoing_requests: int = doc("requests a search replica holds at once (it runs one at a time)", 16, ge=1)
    max_queued_requests: int = doc("requests waiting for a search replica before 503 (-1: unbounded)", 64, ge=-1)

    def validate(self) -> None:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.rerank_candidates > self.max_candidates:
            raise ValueError(f"rerank_candidates ({self.rerank_candidates}) must not exceed max_candidates "
                             f"({self.max_candidates})")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or positive")

    @property
    def served_name(self) -> str:
        if not self.index:
            return ""
        return self.name or Path(self.index).name


@dataclass
class GenerationDefaults:
    max_new_tokens: int = doc("caption/chat tokens when the request gives none", 30, ge=1)
    min_new_tokens: int = doc("minimum caption tokens when the request gives none", 1, ge=0)
    num_beams: int = doc("beams when the request gives none (1 = greedy)", 1, ge=1)
    vqa_max_new_tokens: int = doc("answer tokens when a /v1/vqa request gives none (recipe: 10)", 10, ge=1)
    max_new_tokens_limit: int = doc("largest max_new_tokens a request may ask for", 128, ge=1)
    max_num_beams: int = doc("largest num_beams a request may ask for", 8, ge=1)

    def validate(self) -> None:
        for key, limit in (("max_new_tokens", "max_new_tokens_limit"), ("vqa_max_new_tokens", "max_new_tokens_limit"),
                           ("min_new_tokens", "max_new_tokens"), ("num_beams", "max_num_beams")):
            if getattr(self, key) > getattr(self, limit):
                raise ValueError(f"{key} ({getattr(self, key)}) must not exceed {limit} ({getattr(self, limit)})")


@dataclass
class ServeConfig:
    model: str | None = doc("stage-2 / Blip2ForConditionalGeneration directory (caption, vqa, chat)", None)
    retrieval_model: str | None = doc("stage-1 export or Blip2ForImageTextRetrieval directory (embeddings, match)",
                                      None)
    model_name: str | None = doc("name of the caption model (model) in responses and /v1/models (default: its "
                                 "directory's name)", None)
    retrieval_model_name: str | None = doc("name of the retrieval model (retrieval_model) in responses and "
                                           "/v1/models (default: its directory's name)", None)
    app_name: str = doc("Serve application name", "blip2")
    host: str = doc("HTTP host", "127.0.0.1")
    port: int = doc("HTTP port", 8000)
    device: Literal["cpu", "cuda"] = doc("where the models run", "cpu")
    dtype: Literal["float32", "float16", "bfloat16"] = doc("weights of the frozen ViT and LLM", "float32")
    num_replicas: int = doc("caption deployment replicas (ignored with autoscaling)", 1, ge=1)
    autoscaling: AutoscalingSection | None = doc("autoscale the caption deployment instead of num_replicas", None)
    cpus_per_replica: float = doc("CPUs reserved by each caption replica", 1.0)
    gpus_per_replica: float = doc("GPUs reserved by each caption replica when device is cuda; a whole number > 1 "
                                  "splits the LLM by layer over them (device_map), a fraction shares one GPU", 1.0)
    gpu_memory_gib: float | None = doc("memory of one GPU of the serve nodes, for the deploy-time fit check "
                                       "(None: read with nvidia-smi on each GPU node)", None)
    max_batch_size: int = doc("most rows a caption replica decodes together (continuous batching: requests "
                              "join the running batch at a decode step)", 8, ge=1)
    batch_wait_timeout_s: float = doc("how long an idle caption replica waits for more requests to share the "
                                      "first prefill (only if requests arrived while its last batch ran)", 0.01, ge=0)
    max_seq_len: int = doc("positions of one row's KV-cache slot: the Q-Former queries + prompt tokens + new tokens "
                           "(T5: encoder queries + prompt; decoder new tokens + 1), capped by the LLM's position "
                           "table; each caption replica allocates max_batch_size slots at start-up, and a request "
                           "that does not fit is a 400 naming the limit", 256, ge=2)
    decode_capture: Literal["off", "compile", "cuda_graphs"] = doc(
        "how a caption replica runs its decode step: 'compile' (torch.compile, inductor, one graph per batch-size "
        "bucket, replayed as CUDA graphs on CUDA), 'cuda_graphs' (the eager step captured as CUDA graphs; CUDA "
        "only), 'off' (eager); a capture that fails at start-up falls back to eager with one warning", "off")
    llm_quantization: Literal["none", "int8"] = doc(
        "weight-only quantisation of the LLM's blocks at load time: 'int8' stores them in int8 with one scale per "
        "output channel (about half the LLM's bytes; its effect on the tokens is measured in docs/serving.md)",
        "none")
    max_ongoing_requests: int = doc("requests a caption replica holds at once (>= max_batch_size; those beyond "
                                    "its slots wait in its engine's queue)", 32, ge=1)
    max_queued_requests: int = doc("requests waiting for a caption replica before 503 with Retry-After "
                                   "(-1: unbounded)", 64, ge=-1)
    ingress: IngressSection = doc("the HTTP ingress deployment", factory=IngressSection)
    retrieval: RetrievalSection = doc("the retrieval deployment", factory=RetrievalSection)
    search: SearchSection = doc("the search deployment (/v1/search)", factory=SearchSection)
    max_body_bytes: int = doc("largest request body; larger gets 413", 10_000_000, ge=1)
    max_image_pixels: int = doc("largest width x height of one image; larger gets 413", 25_000_000, ge=1)
    max_images_per_request: int = doc("most images in one /v1/embeddings request", 16, ge=1)
    max_texts_per_request: int = doc("most texts in one /v1/embeddings or /v1/match request", 64, ge=1)
    max_prompt_chars: int = doc("longest prompt, question or chat text", 2000, ge=1)
    allowed_image_url_prefixes: list[str] = doc(
        "http(s) image URL prefixes the server may fetch; empty: only data: URLs and base64", factory=list
    )
    image_fetch_timeout_s: float = doc("timeout of one allowed image URL fetch", 5.0)
    api_token_env: str = doc("environment variable holding the API token; unset or empty: no auth", "BLIP2_API_TOKEN")
    health_check_timeout_s: float = doc("Serve health-check timeout (large models load slowly)", 120.0)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    def validate(self) -> None:
        if not self.model and not self.retrieval_model:
            raise ValueError("give at least one of model (--model DIR) or retrieval_model (--retrieval-model DIR)")
        for key in ("model", "retrieval_model"):
            path = getattr(self, key)
            if path and not Path(path).is_dir():
                raise ValueError(f"{key} {path!r} is not a local directory")
        if self.search.index:
            if not self.retrieval_model:
                raise ValueError("search.index needs retrieval_model (--retrieval-model DIR): the stage-1 model "
                                 "that built the index")
            if not Path(self.search.index).is_dir():
                raise ValueError(f"search.index {self.search.index!r} is not a local directory")
        if self.max_ongoing_requests < self.max_batch_size:
            # otherwise @serve.batch never sees a full batch
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size})")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or positive")
        if self.decode_capture == "cuda_graphs" and self.device != "cuda":
            raise ValueError("decode_capture 'cuda_graphs' needs device cuda; on CPU use 'compile' or 'off'")
        whole = self.gpus_per_replica == int(self.gpus_per_replica)
        if self.gpus_per_replica <= 0 or (self.gpus_per_replica > 1 and not whole):
            raise ValueError(f"gpus_per_replica must be a fraction in (0, 1] or a whole number of GPUs, "
                             f"got {self.gpus_per_replica}")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError("gpu_memory_gib must be positive")
        if self.model and self.retrieval_model and self.caption_model_name == self.retrieval_name:
            raise ValueError(f"the caption and retrieval models are both named {self.caption_model_name!r} (their "
                             f"directories' names); set model_name or retrieval_model_name so requests can tell "
                             f"them apart")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        for p in self.allowed_image_url_prefixes:
            if not p.startswith(("http://", "https://")):
                raise ValueError(f"allowed_image_url_prefixes entry {p!r} must start with http:// or https://")

    @property
    def caption_model_name(self) -> str | None:
        """The name the caption model (`model`) answers to (None: not served)."""
        return (self.model_name or Path(self.model).name) if self.model else None

    @property
    def retrieval_name(self) -> str | None:
        """The name the retrieval model (`retrieval_model`) answers to (None: not served)."""
        return (self.retrieval_model_name or Path(self.retrieval_model).name) if self.retrieval_model else None


def served_model_names(cfg: ServeConfig) -> list[str]:
    """The names of the served models: caption first, then retrieval, then the search index."""
    return [n for n in (cfg.caption_model_name, cfg.retrieval_name, cfg.search.served_name) if n]
