"""The FAISS side of a collection: an id-mapped exact inner-product index, its checkpoint file, its GPU copy.

FAISS ids are the SQLite passage ids, so a search hit maps straight back to its row.
The checkpoint is ``index.faiss`` plus ``index.json`` (the stamp): the last passage id and deletion sequence
the file contains, and the file's sha256. Both are written atomically (temp file, fsync, rename).

>>> index = VectorIndex.empty(dim=384)
>>> index.add(np.eye(2, 384, dtype="float32"), np.array([7, 9]))
>>> index.search(np.eye(1, 384, dtype="float32"), k=1)[1].tolist()
[[7]]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from storage.errors import FaissNotInstalledError

log = logging.getLogger(__name__)

INDEX_TYPE = "IDMap2,Flat"
GPU_MAX_K = 2048  # the largest k FAISS GPU flat search accepts
EXACT_SUBSET_MAX = 65_536  # below this many matches, filtered GPU search is brute force over the matches


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best ``scores`` (descending) and their ``ids``."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, best, axis=1).astype("float32"), ids[best]


def filtered_search(
    search,
    exact_subset,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray,
    total: int,
    max_fetch: int,
    exact_below: int = EXACT_SUBSET_MAX,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among ``allowed`` ids with a search that cannot filter (GPU): exact when few, else over-fetch.

    Over-fetching starts at twice the expected need given the selectivity and grows 4x until every query has
    k allowed hits; when that would pass ``max_fetch`` it falls back to the exact search over the allowed ids.
    """
    if len(allowed) <= exact_below:
        return exact_subset(queries, k, allowed)
    fetch = min(total, max_fetch, max(4 * k, int(2 * k * total / len(allowed))))
    while True:
        scores, ids = search(queries, fetch)
        keep = np.isin(ids, allowed)
        if (keep.sum(axis=1) >= k).all():
            out_scores = np.stack([s[m][:k] for s, m in zip(scores, keep)])
            out_ids = np.stack([i[m][:k] for i, m in zip(ids, keep)])
            return out_scores, out_ids
        if fetch >= min(total, max_fetch):
            return exact_subset(queries, k, allowed)
        fetch = min(total, max_fetch, fetch * 4)


def import_faiss():
    """Import faiss, or say which extra installs it."""
    try:
        import faiss
    except ImportError as exc:
        raise FaissNotInstalledError(
            "faiss is not installed: install exactly one of `pip install 'stella-search[cpu]'` (faiss-cpu) "
            "or `pip install 'stella-search[gpu]'` (faiss-gpu); they provide the same module and must not be "
            "installed together."
        ) from exc
    return faiss


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP thread count for this process."""
    import_faiss().omp_set_num_threads(threads)


def gpu_count() -> int:
    """Number of GPUs this faiss build can use (0 for faiss-cpu)."""
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class Stamp:
    """What a checkpoint file contains: every passage id <= max_passage_id and every deletion <= deletion_seq."""

    max_passage_id: int
    deletion_seq: int
    ntotal: int
    dim: int
    sha256: str = ""


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VectorIndex:
    """An ``IndexIDMap2`` over ``IndexFlatIP``, kept on the CPU, with a GPU copy for search when a GPU exists.

    Thread-safe: mutations and searches are serialised by one lock (FAISS indexes are not safe to mutate while
    searched). The GPU copy is re-made lazily after a change, because GPU flat indexes cannot remove ids.
    """

    def __init__(self, cpu_index, use_gpu: bool | None = None):
        self._cpu = cpu_index
        self._lock = threading.Lock()
        self._use_gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        self._gpu = None
        self._gpu_resources = None

    @classmethod
    def empty(cls, dim: int, use_gpu: bool | None = None) -> VectorIndex:
        faiss = import_faiss()
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), use_gpu=use_gpu)

    @property
    def dim(self) -> int:
        return self._cpu.d

    @property
    def ntotal(self) -> int:
        return self._cpu.ntotal

    @property
    def on_gpu(self) -> bool:
        return self._use_gpu

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            self._cpu.add_with_ids(np.ascontiguousarray(vectors, dtype="float32"), np.asarray(ids, dtype="int64"))
            self._gpu = None

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype="int64")
        if len(ids) == 0:
            return 0
        faiss = import_faiss()
        with self._lock:
            removed = self._cpu.remove_ids(faiss.IDSelectorBatch(ids))
            self._gpu = None
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product: (scores, ids), ids -1 where fewer than k vectors exist.

        ``allowed`` restricts the result to those ids (a metadata filter). On the CPU that is a FAISS
        ``IDSelector``; GPU indexes ignore selectors, so there :func:`filtered_search` searches exactly over the
        allowed vectors when they are few and over-fetches adaptively otherwise, never missing a match.
        """
        queries = np.ascontiguousarray(queries, dtype="float32")
        n = len(queries)
        with self._lock:
            total = self._cpu.ntotal
            limit = total if allowed is None else min(total, len(allowed))
            if limit == 0:
                return np.full((n, 1), -np.inf, dtype="float32"), np.full((n, 1), -1, dtype="int64")
            k = max(1, min(k, limit))
            if allowed is None:
                # GPU flat search takes k <= 2048; deeper searches run on the CPU copy
                searcher = self._cpu if self._use_gpu and k > GPU_MAX_K else self._searcher()
                return searcher.search(queries, k)
            allowed = np.asarray(allowed, dtype="int64")
            if not self._use_gpu:
                faiss = import_faiss()
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
                return self._cpu.search(queries, k, params=params)
            return filtered_search(
                self._searcher().search, self._exact_subset, queries, k, allowed, total, max_fetch=GPU_MAX_K
            )

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the allowed vectors: brute force over them when few, else the CPU copy with an
        IDSelector (never materialising a large subset in memory)."""
        if len(allowed) <= EXACT_SUBSET_MAX:
            vectors = self._cpu.reconstruct_batch(allowed)
            return top_k(queries @ vectors.T, allowed, k)
        faiss = import_faiss()
        return self._cpu.search(queries, k, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)))

    def _searcher(self):
        if not self._use_gpu:
            return self._cpu
        if self._gpu is None:
            faiss = import_faiss()
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu)
        return self._gpu

    def reconstruct(self, passage_id: int) -> np.ndarray:
        with self._lock:
            return self._cpu.reconstruct(int(passage_id))

    def save(self, directory: Path, stamp: Stamp) -> Stamp:
        """Write ``index.faiss`` then ``index.json`` atomically; returns the stamp with the file's sha256."""
        faiss = import_faiss()
        with self._lock:
            data = faiss.serialize_index(self._cpu).tobytes()
        stamp = Stamp(**{**asdict(stamp), "sha256": hashlib.sha256(data).hexdigest()})
        _write_atomically(directory / "index.faiss", data)
        _write_atomically(directory / "index.json", json.dumps(asdict(stamp), indent=2).encode())
        return stamp

    @classmethod
    def load(cls, directory: Path, dim: int, use_gpu: bool | None = None) -> tuple[VectorIndex, Stamp] | None:
        """The checkpoint in ``directory``, or None (with a log line) when it is missing, damaged or foreign."""
        index_path, stamp_path = directory / "index.faiss", directory / "index.json"
        if not index_path.exists() or not stamp_path.exists():
            if index_path.exists() or stamp_path.exists():
                log.warning("index checkpoint in %s is incomplete; rebuilding from SQLite", directory)
            return None
        try:
            stamp = Stamp(**json.loads(stamp_path.read_text()))
            data = index_path.read_bytes()
        except (ValueError, TypeError, OSError) as exc:
            log.warning("index stamp %s is unreadable (%s); rebuilding from SQLite", stamp_path, exc)
            return None
        if hashlib.sha256(data).hexdigest() != stamp.sha256:
            log.warning("index file %s fails its checksum; rebuilding from SQLite", index_path)
            return None
        faiss = import_faiss()
        cpu_index = faiss.deserialize_index(np.frombuffer(data, dtype="uint8"))
        if cpu_index.d != dim or cpu_index.ntotal != stamp.ntotal:
            log.warning("index file %s does not match its stamp or the manifest; rebuilding from SQLite", index_path)
            return None
        return cls(cpu_index, use_gpu=use_gpu), stamp
