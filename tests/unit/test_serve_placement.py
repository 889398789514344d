"""Where a caption replica's model lives: loaded in the serving dtype directly, the LLM split over the
replica's GPUs by layer (device maps computed on the meta device at real size), and the deploy-time
fit check against a fake cluster view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2_ray.config import from_dict
from blip2_ray.errors import UserError
from blip2_ray.model.config import model_config
from blip2_ray.serve import capacity
from blip2_ray.serve.capacity import NodeView, check_caption_fit
from blip2_ray.serve.config import ServeConfig
from blip2_ray.serve.placement import bytes_per_device, layer_device_map, load_caption_model, split_model
from blip2_ray.weights.language_model import build_language_model

GiB = 2**30


def meta_llm(preset: str):
    cfg = model_config(preset, allow_random_init=True)
    with torch.device("meta"):
        return build_language_model(cfg, cfg.llm.vocab_size)


@pytest.fixture(scope="module")
def opt67b():
    return meta_llm("vitg_opt6.7b")


@pytest.fixture(scope="module")
def flant5xxl():
    return meta_llm("vitg_flant5xxl")


def opt_layer_bytes(h: int, f: int) -> int:
    # q, k, v, out (weights + biases), fc1, fc2 (weights + biases), two layer norms; bf16
    return 2 * (4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h)


def device_order(dm: dict, names: list[str], devices: list) -> list[int]:
    return [devices.index(dm[n]) for n in names]


def test_opt67b_two_gpus_balanced_by_layer_bytes(opt67b):
    devices = ["cuda:0", "cuda:1"]
    extra = 2 * GiB  # the ViT + Q-Former on the first GPU
    dm = layer_device_map(opt67b, devices, extra, dtype=torch.bfloat16)
    layers = [f"model.decoder.layers.{i}" for i in range(32)]
    order = device_order(dm, layers, devices)
    assert order == sorted(order) and set(order) == {0, 1}  # contiguous, both used
    # embeddings and the tied head where the tokens enter; the final norm with the last layer
    assert dm["model.decoder.embed_tokens"] == dm["lm_head"] == dm["model.decoder.embed_positions"] == "cuda:0"
    assert dm["model.decoder.final_layer_norm"] == "cuda:1"
    layer = opt_layer_bytes(4096, 16384)
    embed = 2 * (50272 * 4096 + 2050 * 4096)
    per = bytes_per_device(opt67b, dm, torch.bfloat16)
    assert sum(per.values()) == embed + 32 * layer + 2 * 2 * 4096
    # (2 GiB + embeddings + k layers) vs the rest: the split that balances them is k = 13
    total = extra + sum(per.values())
    k = min(range(33), key=lambda k: abs(extra + embed + k * layer - total / 2))
    assert k == 13 and order.index(1) == k
    assert abs(per["cuda:0"] + extra - per["cuda:1"]) <= layer


def test_opt67b_four_gpus(opt67b):
    devices = [0, 1, 2, 3]
    dm = layer_device_map(opt67b, devices, 2 * GiB, dtype=torch.bfloat16)
    order = device_order(dm, [f"model.decoder.layers.{i}" for i in range(32)], devices)
    assert order == sorted(order) and set(order) == {0, 1, 2, 3}
    per = bytes_per_device(opt67b, dm, torch.bfloat16)
    loads = [per[0] + 2 * GiB, per[1], per[2], per[3]]
    assert max(loads) - min(loads) <= 2 * opt_layer_bytes(4096, 16384)


def test_flant5xxl_two_gpus(flant5xxl):
    devices = ["cuda:0", "cuda:1"]
    dm = layer_device_map(flant5xxl, devices, 2 * GiB, dtype=torch.bfloat16)
    blocks = [f"encoder.block.{i}" for i in range(24)] + [f"decoder.block.{i}" for i in range(24)]
    order = device_order(dm, blocks, devices)
    assert order == sorted(order) and set(order) == {0, 1}
    # transformers 5 ties T5's lm_head to `shared`: all embeddings and the head on the first GPU
    for name in ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"):
        if name in dm:
            assert dm[name] == "cuda:0", name
    assert dm["encoder.final_layer_norm"] == dm["encoder.block.23"]
    assert dm["decoder.final_layer_norm"] == dm["decoder.block.23"] == "cuda:1"
    h, inner, f = 4096, 64 * 64, 10240
    enc = 2 * (4 * h * inner + 3 * h * f + 2 * h)  # attention, gated FFN, 2 norms
    dec = 2 * (8 * h * inner + 3 * h * f + 3 * h)  # + cross-attention and its norm
    rel = 2 * 32 * 64  # the relative position bias in block 0 of each stack
    per = bytes_per_device(flant5xxl, dm, torch.bfloat16)
    assert sum(per.values()) == 2 * 32128 * h + 24 * (enc + dec) + 2 * rel + 2 * 2 * h
    assert abs(per["cuda:0"] + 2 * GiB - per["cuda:1"]) <= dec
    # so FlanT5-XXL (about 22 GiB of bf16 weights with the ViT) needs about 11 GiB per GPU on two GPUs
    assert max(per["cuda:0"] + 2 * GiB, per["cuda:1"]) < 12.5 * GiB


# ---------------------------------------------------------------- loading a real directory (tiny)
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_config("tiny")  # stored in float32
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    return export_stage2(build_stage2(cfg, tok), str(tmp_path_factory.mktemp("tiny") / "export"), tok, cfg)


def test_loads_in_serving_dtype_without_a_cast(tiny_export, monkeypatch):
    from blip2_ray.weights import builders

    reads, casts = [], []
    real_read, real_to = builders.strict_from_pretrained, torch.nn.Module.to

    def read(cls, path, what, **kwargs):
        reads.append(kwargs.get("dtype"))
        return real_read(cls, path, what, **kwargs)

    def to(module, *args, **kwargs):
        if any(isinstance(a, torch.dtype) for a in args) or "dtype" in kwargs:
            casts.append(type(module).__name__)
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(builders, "strict_from_pretrained", read)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    model = load_caption_model(tiny_export, "cpu", "bfloat16")
    assert reads == [torch.bfloat16]  # transformers reads the float32 checkpoint straight into bf16
    assert casts == []  # and nothing is cast afterwards (no second copy of a module)
    assert {p.dtype for p in model.vision_model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}
    trainable = list(model.qformer.parameters()) + list(model.language_projection.parameters())
    assert {p.dtype for p in trainable} | {model.query_tokens.dtype} == {torch.float32}


def test_split_model_covers_every_module_and_keeps_tokens(tiny_export):
    model = load_caption_model(tiny_export, "cpu", "float32")
    px = torch.from_numpy(np.random.RandomState(0).rand(1, 3, 32, 32).astype(np.float32))
    before = model.generate(px, num_beams=1, max_new_tokens=6)
    dm = layer_device_map(model.language_model, ["cpu", "cpu"])
    assert {"model.decoder.layers.0", "model.decoder.layers.1", "lm_head"} <= set(dm)
    split_model(model, dm, "cpu")  # place_language_model raises if a parameter has no device
    assert torch.equal(model.generate(px, num_beams=1, max_new_tokens=6), before)


@pytest.mark.gpu
def test_split_over_gpus_generates_as_on_one(tiny_export):
    """The LLM over two GPUs (or cuda:0 + the CPU where there is one GPU): the prefill logits of the whole
    model on cuda:0, and the engine's streamed tokens are the split model's own `generate` tokens."""
    import asyncio

    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.model.generation import prefill
    from blip2_ray.serve.engine import GenerationEngine
    from blip2_ray.weights.tokenizers import load_llm_tokenizer

    px = torch.from_numpy(np.random.RandomState(0).rand(1, 3, 32, 32).astype(np.float32)).cuda()
    one = load_caption_model(tiny_export, "cuda", "float32")
    _, expected = prefill(one, px)
    if torch.cuda.device_count() >= 2:
        model = load_caption_model(tiny_export, "cuda", "float32", gpus_per_replica=2)
    else:
        model = load_caption_model(tiny_export, "cpu", "float32")
        split_model(model, layer_device_map(model.language_model, ["cuda:0", "cpu"]), "cuda:0")
    assert len({p.device for p in model.language_model.parameters()}) == 2
    _, logits = prefill(model, px)
    assert logits.device == px.device
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    tokens = model.generate(px, num_beams=1, max_new_tokens=6, min_new_tokens=6)[0].tolist()
    tok = load_llm_tokenizer(tiny_export)
    engine = GenerationEngine(model, tok, caption_stop_ids(tok, model.llm_family), lambda p: torch.from_numpy(p).cuda())
    item = {"pixel_values": px[0].cpu().numpy(), "prompt": "", "max_new_tokens": 6, "min_new_tokens": 6,
            "num_beams": 1, "temperature": 0.0}

    async def run():  # a shorter row in the same batch leaves first: the cache rows are selected per device
        short, full = engine.submit({**item, "max_new_tokens": 3, "min_new_tokens": 3}), engine.submit(item)
        return await short.result(), await full.result()

    short, full = asyncio.run(run())
    assert short["token_ids"] == tokens[:3] and full["token_ids"] == tokens


# ---------------------------------------------------------------- deploy-time fit check
def real_size_dir(tmp_path, llm: str) -> str:
    """A Blip2ForConditionalGeneration config.json of real size (no weights: the check reads the config only)."""
    from transformers import Blip2Config, OPTConfig, T5Config

    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14)
    qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   encoder_hidden_size=1408)
    if llm == "flant5xxl":
        text = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        text = OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                         vocab_size=50272, word_embed_proj_dim=2560)
    Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                num_query_tokens=32).save_pretrained(str(tmp_path))
    return str(tmp_path)


def serve_cfg(model_dir: str, **kw) -> ServeConfig:
    return from_dict(ServeConfig, {"model": model_dir, **kw})


def gpu_node(gpus: int, gib: float) -> NodeView:
    return NodeView(cpus=8, gpus=gpus, memory_bytes=64 * GiB, gpu_memory_bytes=gib * GiB)


def test_flant5xxl_does_not_fit_one_24gb_gpu_but_fits_two(tmp_path):
    d = real_size_dir(tmp_path, "flant5xxl")
    with pytest.raises(UserError) as e:
        check_caption_fit(serve_cfg(d, device="cuda", dtype="bfloat16", gpus_per_replica=1), [gpu_node(2, 22.0)])
    message = str(e.value)
    needed = float(message.split("needs ")[1].split(" GiB")[0])
    assert 23.0 < needed < 25.0 and "22.0 GiB each" in message and "gpus_per_replica" in message
    check_caption_fit(serve_cfg(d, device="cuda", dtype="bfloat16", gpus_per_replica=2), [gpu_node(2, 22.0)])
    with pytest.raises(UserError, match="no node of the cluster has that many GPUs"):
        check_caption_fit(serve_cfg(d, device="cuda", dtype="bfloat16", gpus_per_replica=2), [gpu_node(1, 80.0)])
    with pytest.raises(UserError, match="0.5 of a GPU"):  # a fraction is a share of the memory
        check_caption_fit(serve_cfg(d, device="cuda", dtype="bfloat16", gpus_per_replica=0.5), [gpu_node(1, 40.0)])


def test_cpu_fit_uses_host_memory(tmp_path):
    d = real_size_dir(tmp_path, "opt2.7b")
    small = NodeView(cpus=2, gpus=0, memory_bytes=6 * GiB)
    with pytest.raises(UserError, match=r"needs \d+\.\d GiB of host memory but the largest node has 6.0 GiB"):
        check_caption_fit(serve_cfg(d, dtype="bfloat16"), [small])
    check_caption_fit(serve_cfg(d, dtype="bfloat16"), [NodeView(cpus=2, gpus=0, memory_bytes=16 * GiB)])
    with pytest.raises(UserError, match="float32 does not fit"):  # twice the bytes
        check_caption_fit(serve_cfg(d, dtype="float32"), [NodeView(cpus=2, gpus=0, memory_bytes=12 * GiB)])


def test_build_app_checks_the_fit_before_deploying(tmp_path, monkeypatch):
    from blip2_ray.serve.app import build_app

    d = real_size_dir(tmp_path, "flant5xxl")
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):  # the kind check sees a whole
        (tmp_path / name).write_text("")                                             # directory (names only)
    monkeypatch.setattr(capacity, "cluster_nodes", lambda gpu_memory_gib: [gpu_node(1, 22.5)])  # a 24 GB A10G
    with pytest.raises(UserError, match="does not fit"):
        build_app(serve_cfg(d, device="cuda", dtype="bfloat16"))


def test_gpus_per_replica_must_be_a_fraction_or_whole(tmp_path):
    with pytest.raises(ValueError, match="gpus_per_replica"):
        serve_cfg(str(tmp_path), gpus_per_replica=1.5)
