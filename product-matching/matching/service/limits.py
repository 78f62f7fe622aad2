"""Overload guards of the app: bounded decoding and a deadline for request bodies.

Decoding is what costs memory (a 64 Mpx image is ~0.5 GB while PIL holds it), so only
`max_decodes` requests decode at once; a request that waits `queue_timeout_s` for a slot
gets 503 with Retry-After instead of piling up. A client that sends headers and then
stalls (or trickles) its body holds a connection and a worker's place: `BodyTimeout`
answers 408 and closes the connection once the body has not arrived in `body_timeout_s`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from contextlib import contextmanager

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def busy(message: str, retry_after_s: float) -> HTTPException:
    """503 saying why, with the seconds after which a retry is likely to be served."""
    return HTTPException(503, message, headers={"Retry-After": str(math.ceil(retry_after_s))})


class Admission:
    """At most `limit` holders at once; a caller waits up to `timeout_s`, then gets 503."""

    def __init__(self, limit: int, timeout_s: float, key: str, what: str) -> None:
        self._slots = threading.BoundedSemaphore(int(limit))
        self.limit, self.timeout_s, self.key, self.what = int(limit), float(timeout_s), key, what

    @contextmanager
    def slot(self):
        if not self._slots.acquire(timeout=self.timeout_s):
            raise busy(
                f"the service is busy: {self.key}={self.limit} requests are {self.what} and "
                f"none finished within queue_timeout_s={self.timeout_s:g}; retry shortly",
                max(1.0, self.timeout_s),
            )
        try:
            yield
        finally:
            self._slots.release()


class BodyTimeout:
    """ASGI middleware: the whole request body must arrive within `timeout_s` of the app's
    first read; otherwise 408 with `Connection: close` (uvicorn then drops the connection),
    raised from the read like any HTTPException."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, float(timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        complete = False

        async def timed() -> Message:
            nonlocal deadline, complete
            if complete:  # body done: what remains is a disconnect, wait for it freely
                return await receive()
            deadline = deadline or time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except (asyncio.TimeoutError, TimeoutError):
                raise HTTPException(
                    408,
                    f"the request body did not arrive within body_timeout_s={self.timeout_s:g}",
                    headers={"Connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)
