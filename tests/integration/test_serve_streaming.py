"""A model big enough that one answer takes seconds on CPU, served for real: requests admitted while a batch
generates, tokens streamed as they are generated (OpenAI client), and a client that goes away freeing its slot."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest

from blip2_ray.runtime.cluster import free_port

TOKENS = 24  # a streamed answer's max_tokens: with the app's min_new_tokens, every answer has exactly this many
LONG = 250  # the app's default (and minimum) answer length


def b64(seed: int) -> str:
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(40, 48, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def messages(seed: int) -> list:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(seed)}}
    return [{"role": "user", "content": [{"type": "text", "text": "a photo of"}, image]}]


@pytest.fixture(scope="module")
def slow(ray_session, tmp_path_factory, until_served):
    """'slow': an OPT of 12 x 768 (about 90M parameters): one long answer takes seconds on this machine."""
    import httpx
    import torch
    from ray import serve

    from blip2_ray.config import from_dict
    from blip2_ray.model.config import model_config
    from blip2_ray.serve.app import build_app
    from blip2_ray.serve.config import ServeConfig
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    torch.manual_seed(0)
    cfg = model_config("tiny", llm={"hidden_size": 768, "num_layers": 12, "num_heads": 12, "ffn_size": 3072,
                                    "max_positions": 512})
    tok = llm_tokenizer(cfg)
    model_dir = export_stage2(build_stage2(cfg, tok), str(tmp_path_factory.mktemp("slow") / "slow-opt"), tok, cfg)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = from_dict(ServeConfig, {
        "model": model_dir, "cpus_per_replica": 0.5, "ingress": {"cpus_per_replica": 0.25}, "max_batch_size": 8,
        "max_seq_len": 320,  # 8 queries + the prompt + LONG new tokens fit a KV-cache slot
        "batch_wait_timeout_s": 0.0, "api_token_env": "BLIP2_SERVE_STREAM_TEST_UNSET",
        "generation": {"max_new_tokens": LONG, "min_new_tokens": LONG, "max_new_tokens_limit": 256},
    })
    serve.run(build_app(app, name_prefix="Slow"), name="slow", route_prefix="/")
    handle = serve.get_deployment_handle("SlowCaptionDeployment", app_name="slow")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=600) as client:
        until_served(client)
        yield {"base": base, "client": client, "stats": lambda: handle.stats.remote().result(timeout_s=60)}
    serve.shutdown()


def wait_for(predicate, what: str, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_request_is_admitted_while_a_batch_generates(slow):
    c = slow["client"]
    long_body = {"image": b64(1), "max_new_tokens": 200, "min_new_tokens": 200}
    with cf.ThreadPoolExecutor(1) as ex:
        long = ex.submit(c.post, "/v1/caption", json=long_body)
        wait_for(lambda: slow["stats"]()["running"] == 1, "the long request to start generating")
        short = c.post("/v1/caption", json={"image": b64(2), "max_new_tokens": 4, "min_new_tokens": 4})
        still_generating = not long.done() and slow["stats"]()["running"] == 1
        assert short.status_code == 200, short.text
        assert short.headers["x-batch-size"] == "2"  # it joined the running batch at a decode step
        assert still_generating  # ... and finished while the long one kept generating
        r = long.result()
    assert r.status_code == 200 and r.headers["x-batch-size"] == "1"


def test_openai_stream_sends_tokens_as_they_are_generated(slow):
    import openai

    client = openai.OpenAI(base_url=slow["base"] + "/v1", api_key="unused", max_retries=0)
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="slow-opt", messages=messages(3), max_tokens=TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    arrivals, text, finish, usage, usage_only = [], "", None, None, None
    for chunk in stream:
        if not chunk.choices:  # OpenAI's usage-only chunk (include_usage)
            usage_only = chunk.usage
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            arrivals.append(time.perf_counter() - t0)
            text += choice.delta.content
        if choice.finish_reason:
            finish, usage = choice.finish_reason, chunk.usage
    assert len(arrivals) >= 5, arrivals
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals  # the first text well before the last
    assert finish == "length" and usage.completion_tokens == TOKENS and usage_only.completion_tokens == TOKENS
    whole = client.chat.completions.create(model="slow-opt", messages=messages(3), max_tokens=TOKENS)
    assert text == whole.choices[0].message.content  # the same greedy tokens, streamed or not


def serve_log_tail(offsets: dict[Path, int] | None = None) -> tuple[dict[Path, int], str]:
    """(end offset of each Serve log file, the text written since `offsets`)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    ends, new = {}, []
    for f in sorted(logs.glob("*.log")):
        data = f.read_bytes()
        ends[f] = len(data)
        new.append(data[(offsets or {}).get(f, 0):].decode("utf-8", "replace"))
    return ends, "".join(new)


def test_a_client_that_goes_away_frees_its_slot_without_a_5xx(slow):
    c = slow["client"]
    before = slow["stats"]()
    offsets, _ = serve_log_tail()
    body = {"messages": messages(4), "stream": True}  # LONG tokens, no early stop
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
            if seen >= 3:
                break  # leave mid-stream: the connection closes here
    after = wait_for(lambda: (s := slow["stats"]())["cancelled"] > before["cancelled"] and s["running"] == 0 and s,
                     "the abandoned row to leave the batch")
    assert after["finished"] == before["finished"]  # it did not run to its LONG tokens
    # the request's log lines land after it ends: wait (bounded) for the first, then a moment for the others
    deadline, logged = time.time() + 60, ""
    while "/v1/chat/completions" not in logged and time.time() < deadline:
        time.sleep(0.2)
        _, logged = serve_log_tail(offsets)
    time.sleep(1.0)
    _, logged = serve_log_tail(offsets)
    assert "/v1/chat/completions" in logged
    assert not re.search(r"/v1/chat/completions 5\d\d", logged), logged[-3000:]
    assert "Traceback" not in logged, logged[-3000:]
    # the slot is free: a new request is served at once
    r = c.post("/v1/caption", json={"image": b64(5), "max_new_tokens": 2, "min_new_tokens": 2})
    assert r.status_code == 200 and r.headers["x-batch-size"] == "1"
