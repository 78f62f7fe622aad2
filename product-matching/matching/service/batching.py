"""Micro-batching: concurrent requests' images embedded together in one forward pass.

A batch-1 forward pass on a GPU costs nearly as much as a batch of 8, so embedding the
queries of several concurrent requests together multiplies throughput there; on a 2-core
CPU it gains 1.2-1.7x at 4-8 clients (bench/README.md). One worker thread owns the model:
it takes the oldest waiting request, gathers others that arrive within `window_ms` (0: those
already waiting; up to `max_batch` images), embeds them at once and hands each caller its
own rows through a future. So at most one forward pass runs at a time, never
more than `max_batch` images (a single request with more images runs alone), and requests
never see each other's rows: the model is in eval mode, so batch statistics do not mix.

    batcher = MicroBatcher(embedder, window_ms=0, max_batch=16)
    batcher.embed(images)        # from any thread; same result as embedder.embed(images)

`max_batch=1` turns batching off (one request per forward pass, still one at a time).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from matching.service.embedder import Embedder


class Busy(RuntimeError):
    """The request waited `timeout_s` and the model did not start on it: try later."""


class MicroBatcher(Embedder):
    """An `Embedder` in front of another, batching the calls of concurrent threads."""

    def __init__(self, embedder: Embedder, window_ms: float, max_batch: int) -> None:
        if window_ms < 0 or max_batch < 1:
            raise ValueError(
                f"batch_window_ms must be >= 0 and max_batch >= 1, got {window_ms}, {max_batch}"
            )
        self.inner = embedder
        self.image_size, self.name, self.key = embedder.image_size, embedder.name, embedder.key
        self.window_s, self.max_batch = window_ms / 1000, int(max_batch)
        self._queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()
        self._start = threading.Lock()
        self._worker: threading.Thread | None = None
        self._carry: tuple[np.ndarray, Future] | None = None  # opens the next batch
        self.batch_sizes: list[int] = []  # images per forward pass, most recent last (bounded)

    def embed(self, images: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """`inner.embed(images)`, run in a shared batch. Busy when the model has not started
        on these images within `timeout_s` (None: wait as long as it takes)."""
        if not len(images):
            return self.inner.embed(images)
        self._ensure_worker()
        future: Future = Future()
        self._queue.put((images, future))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            if future.cancel():  # still queued: the worker will skip it
                raise Busy(
                    f"the model did not start on the request within {timeout_s:g} s"
                ) from None
            return future.result()  # already running: its result is moments away

    def _ensure_worker(self) -> None:
        with self._start:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
                self._worker.start()

    def _gather(self) -> list[tuple[np.ndarray, Future]]:
        """The oldest waiting request and those arriving within the window, up to the cap."""
        batch = [self._carry or self._queue.get()]
        self._carry = None
        count = len(batch[0][0])
        deadline = time.monotonic() + self.window_s
        while count < self.max_batch:
            try:
                left = deadline - time.monotonic()
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if count + len(item[0]) > self.max_batch:
                self._carry = item  # too large to join: first in the next batch
                break
            batch.append(item)
            count += len(item[0])
        return batch

    def _run(self) -> None:
        while True:
            batch = [(x, f) for x, f in self._gather() if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                out = self.inner.embed(np.concatenate([x for x, _ in batch]))
            except BaseException as exc:  # every caller of the batch learns why
                for _, f in batch:
                    f.set_exception(exc)
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(out)]
            start = 0
            for x, f in batch:
                f.set_result(out[start : start + len(x)])
                start += len(x)
