"""Streaming answers of the ingress: the SSE body of a streamed chat completion (`sse_events`) and the
response that carries it behind Ray Serve's proxy (`ServeStreamingResponse`)."""

from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError

from blip2_ray.serve import chat


class ServeStreamingResponse(StreamingResponse):
    """A StreamingResponse that takes Ray Serve's cancelled `receive()` for the disconnect it is.

    Behind Serve's proxy a client that goes away cancels the replica's pending `receive()`: it raises
    `TaskCancelledError` instead of returning `{"type": "http.disconnect"}`, and starlette would let that
    escape with a traceback in the replica's log. Returning ends the response the way a disconnect does
    (the body generator is cancelled, and with it the request's row in the batch).
    """

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except TaskCancelledError:
            return


async def sse_events(first: dict, parts, writer: chat.ChunkWriter, include_usage: bool):
    """The SSE body. A client that goes away cancels this generator: the cancel reaches the replica,
    whose row leaves the batch at the next decode step."""
    try:
        yield writer.delta({"role": "assistant", "content": ""})
        part = first
        while True:
            if part["delta"]:
                yield writer.delta({"content": part["delta"]})
            if "done" in part:
                out = part["done"]
                yield writer.delta({}, out["finish_reason"], chat.usage(out))
                if include_usage:
                    yield writer.usage_only(chat.usage(out))
                yield writer.done()
                return
            try:
                part = await parts.__anext__()
            except StopAsyncIteration:
                return
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the status line is gone: report the failure in the stream
        yield writer.error(500, "server_error", f"generation failed ({e.__class__.__name__})")
        yield writer.done()
    finally:
        parts.cancel()
