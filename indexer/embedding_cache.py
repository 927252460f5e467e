"""An on-disk cache of passage vectors keyed by the exact text encoded, one SQLite file per model fingerprint.

Enabled by ``embedding.cache_embeddings``: building a second collection with the same model, or rebuilding one,
then skips the encoder for every text it has seen.

>>> cache = EmbeddingCache(tmp_path, "abc123")
>>> cache.put(["hello"], np.ones((1, 4), dtype="float32"))
>>> cache.get(["hello", "other"])
{0: array([1., 1., 1., 1.], dtype=float32)}
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np
import sqlite_utils


class EmbeddingCache:
    def __init__(self, directory: Path, fingerprint: str):
        directory.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(directory / f"{fingerprint}.db", timeout=30, check_same_thread=False)
        self._db = sqlite_utils.Database(conn)
        self._db.enable_wal()
        self._db["vectors"].create({"key": str, "vector": bytes}, pk="key", if_not_exists=True)
        self._lock = threading.Lock()  # one connection, shared by the threads that encode

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, texts: list[str]) -> dict[int, np.ndarray]:
        """``{position in texts: vector}`` for the texts already cached."""
        keys = [self._key(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        with self._lock:
            self._fetch(keys, found)
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def _fetch(self, keys: list[str], found: dict[str, np.ndarray]) -> None:
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(blob, dtype="float32")

    def put(self, texts: list[str], vectors: np.ndarray) -> None:
        with self._lock, self._db.atomic():
            self._db.conn.executemany(
                "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                [(self._key(t), np.asarray(v, dtype="float32").tobytes()) for t, v in zip(texts, vectors)],
            )
