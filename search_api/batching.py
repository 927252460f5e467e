"""Dynamic micro-batching of concurrent queries onto one encoder.

Each search thread submits its query texts and waits; one dedicated thread takes the first waiting request plus
every request queued behind it (up to ``max_batch`` texts, waiting at most ``window_ms`` for more), encodes them
in one encode call (length-sorted batches of ``encoder.batch_size``) and hands each caller its rows. A lone
request is encoded at once, so an idle server adds no latency; under load, requests that arrive while a batch is
encoding ride in the next one. Torch also runs on one steady thread instead of whichever pool thread a request
landed on.

>>> batcher = QueryBatcher(encoder, max_batch=64, window_ms=0)
>>> batcher.encode_queries(["what is faiss"]).shape
(1, 384)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from indexer.encoder import Encoder

log = logging.getLogger(__name__)


class QueryBatcher:
    """Stands in for an :class:`Encoder` in retrieval: ``encode_queries`` is batched, the rest is delegated."""

    def __init__(self, encoder: Encoder, max_batch: int = 64, window_ms: float = 0.0, observe=None):
        self.encoder = encoder
        self.max_batch = max_batch
        self.window = window_ms / 1000
        self._observe = observe or (lambda seconds, texts, requests: None)
        self._queue: queue.Queue[tuple[list[str], Future] | None] = queue.Queue()
        self._closed = False
        self._gate = threading.Lock()  # a text is queued before the closing None or encoded by its caller
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        future: Future = Future()
        with self._gate:
            queued = not self._closed
            if queued:
                self._queue.put((list(texts), future))
        if not queued:  # closed (its encoder released) while a request still held it: encode on the caller's thread
            return self.encoder.encode_queries(texts)
        return future.result()

    def close(self) -> None:
        """Stop the batching thread once the queued texts are encoded; later calls encode on their own thread."""
        with self._gate:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=10)

    def _take_batch(self, first: tuple[list[str], Future]) -> list[tuple[list[str], Future]]:
        batch, size = [first], len(first[0])
        deadline = time.monotonic() + self.window
        while size < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                item = self._queue.get_nowait() if timeout <= 0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
            size += len(item[0])
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._take_batch(first)
            texts = [t for item, _ in batch for t in item]
            started = time.perf_counter()
            try:
                vectors = self.encoder.encode_queries(texts)
            except BaseException as exc:  # every waiting caller gets the error, the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            try:
                self._observe(time.perf_counter() - started, len(texts), len(batch))
            except Exception:  # metrics must never stop the batcher
                log.exception("observing a query batch failed")
            offset = 0
            for item, future in batch:
                future.set_result(vectors[offset : offset + len(item)])
                offset += len(item)
