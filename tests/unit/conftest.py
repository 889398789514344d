"""Fixtures shared by unit test modules."""

import pytest
import torch

from blip2_ray.fixtures.backbones import one_torch_thread as torch_on_one_thread


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Unit tests run torch on one thread (restored after each module: an xdist worker runs integration files
    too). `make test` runs two pytest workers on 2 cores; beside a CPU-bound process, two threads per worker
    spin against each other: `pytest -n 2 tests/unit` with `python3 -c "while True: pass"` beside it took 211.67 s,
    with OMP_NUM_THREADS=1 162.69 s (2026-12-06, 2-core machine)."""
    with torch_on_one_thread():
        yield


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def varied_stage2(request):
    """(model, tokenizer, eos ids) of a tiny stage-2 model (OPT, then T5) whose LLM and projection have larger
    random weights, so that generated tokens change with the context (the tiny init repeats one token)."""
    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    torch.manual_seed(0)
    cfg = model_config(request.param)
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    with torch.no_grad():
        for p in list(model.language_model.parameters()) + list(model.language_projection.parameters()):
            if p.dim() == 2:
                p.normal_(0, 1.0)
    return model, tok, caption_stop_ids(tok, model.llm_family)


HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
              "aten::multinomial", "aten::unique_consecutive", "aten::_unique2", "aten::masked_select"}


@pytest.fixture
def host_reads():
    """A TorchDispatchMode class recording every operation that reads a tensor's value on the host (a device sync
    on a GPU): `with host_reads(allowed=[tensors]) as r: ...; r.seen`. `allowed`: tensors whose reads are not
    syncs on a GPU (e.g. torch AdamW's step counters, CPU tensors there too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self, allowed=()):
            super().__init__()
            self.allowed = {id(t) for t in allowed}
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in HOST_READS and not (args and id(args[0]) in self.allowed):
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    return HostReads
