"""The FAISS side of a collection: an inner-product index of one type, its checkpoint file, its GPU copy.

FAISS ids are the SQLite passage ids, so a search hit maps straight back to its row.
The checkpoint is ``index.faiss`` plus ``index.json`` (the stamp): the last passage id and deletion sequence
the file contains, the index type, any tombstones, and the file's sha256. Both are written atomically
(temp file, fsync, rename).

Index types are FAISS factory strings, kept as FAISS spells them (:func:`resolve_index_type`):

- ``IDMap2,Flat``: exact search (the default, and what ``auto`` picks below ``AUTO_FLAT_MAX`` vectors);
- ``IVF{nlist},SQ8`` (or ``,Flat``, ``,SQ8``, ``,PQ{m}`` codes; ``IVF{nlist}_HNSW32,...`` at a million vectors and
  more): inverted lists, ids stored natively, searched with ``nprobe``;
- ``IDMap2,HNSW{M}``: a graph, searched with ``efSearch``. HNSW cannot remove vectors, so deletes become tombstones
  excluded by an ``IDSelector`` at search time until the next rebuild (``Collection.optimize``).

Search parameters of the approximate types are tuned at build time by :func:`tune` and applied per search with
FAISS ``SearchParameters`` objects (never by mutating the shared index, which other threads may be searching).

>>> index = VectorIndex.empty(dim=384)
>>> index.add(np.eye(2, 384, dtype="float32"), np.array([7, 9]))
>>> index.search(np.eye(1, 384, dtype="float32"), k=1)[1].tolist()
[[7]]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from storage.errors import FaissNotInstalledError, InvalidInputError

log = logging.getLogger(__name__)

INDEX_TYPE = "IDMap2,Flat"  # exact search: new collections, and every collection made before index types existed
AUTO = "auto"
# Below this many vectors ``auto`` keeps exact search: measured on this 2-core CPU (scripts/bench_scale.py), one-thread
# Flat search of 50k MiniLM vectors takes less than encoding the query (2.7 against 3.6 ms with ONNX), so an
# approximate index would not halve a search's latency yet would cost recall, a training step and tuning.
AUTO_FLAT_MAX = 50_000
AUTO_HNSW_QUANTIZER_MIN = 1_000_000  # from here the coarse quantiser itself is an HNSW graph over the centroids
NLIST_PER_SQRT_N = 4  # low end of the usual 4-16 x sqrt(N): k-means on 2 CPU cores stays within minutes
TRAIN_POINTS_PER_LIST = 64  # k-means sample per centroid (FAISS warns below 39; its default cap is 256)
# Fewer stored vectors than this cannot tune an approximate index: recall@10 is measured on at least this many held-out
# passages (to about +-0.05); and an exact search of so few vectors takes microseconds anyway.
MIN_TUNING_QUERIES = 100
HNSW_EF_CONSTRUCTION = 80  # FAISS's default 40 leaves recall on the table at little build-time saving
DEFAULT_RECALL = 0.95
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
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


_search_threads: int | None = None  # what set_search_threads asked for, applied per thread by search()
_applied = threading.local()


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP thread count for every thread of this process that searches.

    OpenMP keeps the count per calling thread: set once in the main thread, the server's request threads
    still ran FAISS with a team of one thread per core, whose spinning slowed the encoder's own team on the same
    2 cores (single-query p50 17.3 ms against 12.6 ms with micro-batching, where encode and search run on
    different threads). So each searching thread applies the count itself, once (:func:`apply_search_threads`).
    """
    global _search_threads
    _search_threads = threads
    apply_search_threads()


def apply_search_threads() -> None:
    """Give the calling thread the FAISS thread count set by :func:`set_search_threads` (a no-op if unset)."""
    wanted = _search_threads
    if wanted is not None and getattr(_applied, "threads", None) != wanted:
        import_faiss().omp_set_num_threads(wanted)
        _applied.threads = wanted


def gpu_count() -> int:
    """Number of GPUs this faiss build can use (0 for faiss-cpu)."""
    faiss = import_faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def auto_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ``NLIST_PER_SQRT_N * sqrt(n)``, at least 1."""
    return max(1, round(NLIST_PER_SQRT_N * math.sqrt(n)))


def resolve_index_type(requested: str, n: int, dim: int = 384) -> str:
    """The FAISS factory string that ``requested`` means for ``n`` vectors of ``dim`` dimensions.

    ``auto``: ``IDMap2,Flat`` below ``AUTO_FLAT_MAX``, else ``IVF{nlist},SQ8`` (``IVF{nlist}_HNSW32,SQ8`` from
    ``AUTO_HNSW_QUANTIZER_MIN``). ``Flat`` and ``HNSW{M}`` get the ``IDMap2`` wrapper that maps FAISS ids to
    passage ids; ``IVF`` types store ids themselves, and ``IVF,SQ8`` / ``IVF_HNSW32,SQ8`` get ``nlist`` filled in.

    >>> resolve_index_type("auto", 120_000)
    'IVF1386,SQ8'
    >>> resolve_index_type("HNSW32", 120_000)
    'IDMap2,HNSW32'
    """
    spec = requested.strip()
    if spec == AUTO:
        if n < AUTO_FLAT_MAX:
            return INDEX_TYPE
        quantiser = "_HNSW32" if n >= AUTO_HNSW_QUANTIZER_MIN else ""
        return f"IVF{auto_nlist(n)}{quantiser},SQ8"
    if spec.startswith("IDMap2,"):
        spec = spec[len("IDMap2,") :]
    if spec == "Flat" or spec.startswith("HNSW"):
        spec = f"IDMap2,{spec}"
    elif spec.startswith("IVF,") or spec.startswith("IVF_"):
        spec = f"IVF{auto_nlist(n)}{spec[3:]}"
    elif not spec.startswith("IVF"):
        raise InvalidInputError(
            f"unknown index type {requested!r}: use auto, Flat, HNSW32 (any M), or an IVF factory string such as "
            "IVF,SQ8, IVF4096,SQ8, IVF,Flat, IVF,PQ48 or IVF_HNSW32,SQ8"
        )
    # FAISS aborts the process (not an exception) on zero lists or graph links
    if any(int(number) < 1 for number in re.findall(r"(?:IVF|HNSW)(\d+)", spec)):
        raise InvalidInputError(f"index type {requested!r}: IVF lists and HNSW links must be at least 1")
    faiss = import_faiss()
    try:
        faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidInputError(f"FAISS cannot build index type {spec!r}: {str(exc).splitlines()[0]}") from None
    return spec


def training_minimum(index_type: str, dim: int = 384) -> int:
    """Vectors FAISS needs to train ``index_type`` (a resolved factory string): one per inverted list, and for PQ codes
    one per centroid of each sub-quantiser; 0 for types that need no training.

    >>> training_minimum("IVF18,SQ8"), training_minimum("IVF18,PQ48"), training_minimum("IDMap2,HNSW32")
    (18, 256, 0)
    """
    faiss = import_faiss()
    probe = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(probe)
    if probe.is_trained or ivf is None:
        return 0
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    return max(ivf.nlist, pq.ksub if pq is not None else 0)


def exact_fallback(index_type: str, n: int, dim: int = 384) -> str | None:
    """Why ``n`` vectors are too few for the approximate ``index_type`` (so an exact index serves them), or None.

    >>> exact_fallback("IVF18,SQ8", 20)
    'exact search (IDMap2,Flat): 20 vectors are too few to train and tune IVF18,SQ8, which needs 100'
    """
    if index_family(index_type) == "flat":
        return None
    needed = max(MIN_TUNING_QUERIES, training_minimum(index_type, dim))
    if n >= needed:
        return None
    return f"exact search ({INDEX_TYPE}): {n} vectors are too few to train and tune {index_type}, which needs {needed}"


def exact_search(queries: np.ndarray, blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over ``blocks`` of ``(vectors, ids)``, kept in a ``faiss.ResultHeap``: (scores,
    ids) of shape (len(queries), k), ids -1 where fewer than k vectors exist.

    >>> exact_search(np.eye(1, 4, dtype="float32"), [(np.eye(2, 4, dtype="float32"), np.array([7, 9]))], 1)[1]
    array([[7]])
    """
    heap = import_faiss().ResultHeap(len(queries), k, keep_max=True)
    for vectors, ids in blocks:
        if len(ids):
            scores = np.ascontiguousarray(queries @ vectors.T, "float32")
            heap.add_result(scores, np.ascontiguousarray(np.broadcast_to(np.asarray(ids, "int64"), scores.shape)))
    heap.finalize()
    return heap.D, heap.I


def index_family(index_type: str) -> str:
    """``flat``, ``ivf`` or ``hnsw``: which search parameter and delete strategy an index type has."""
    if index_type.startswith("IVF"):
        return "ivf"
    return "hnsw" if index_type.startswith("IDMap2,HNSW") else "flat"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k ids) present in the same row of ``found``."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def tune(
    index: VectorIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float,
    excluded: list[np.ndarray] | None = None,
) -> tuple[dict, float]:
    """The cheapest search parameters whose recall@k against ``truth`` (exact top-k ids) reaches ``target``.

    Returns them with the recall they reach. With ``excluded`` (per query, ids left out of its results: the
    passages of its own document when the queries are stored vectors) each query is searched alone with an
    ``IDSelector``. IVF raises ``nprobe`` and HNSW ``efSearch`` step by step; when no step reaches the target,
    the last one and its recall are returned (and logged).
    """
    family = index_family(index.index_type)
    if family == "flat":
        return {}, 1.0
    k = truth.shape[1]
    if family == "ivf":
        name, steps = "nprobe", [s for s in NPROBE_STEPS if s < index.nlist] + [index.nlist]
    else:
        name, steps = "efSearch", [s for s in EF_SEARCH_STEPS if s >= k]
    recall = 0.0
    for step in steps:
        index.search_params = {name: step}
        if excluded is None:
            ids = index.search(queries, k)[1]
        else:
            ids = np.concatenate([index.search(q[None, :], k, excluded=e)[1] for q, e in zip(queries, excluded)])
        recall = recall_at_k(ids, truth)
        if recall >= target:
            break
    else:
        log.warning(
            "%s reaches recall@%d %.3f at most (%s %d), short of %.3f", index.index_type, k, recall, name, step, target
        )
    return dict(index.search_params), recall


@dataclass(frozen=True)
class Stamp:
    """What a checkpoint file contains: every passage id <= max_passage_id and every deletion <= deletion_seq."""

    max_passage_id: int
    deletion_seq: int
    ntotal: int  # vectors in the file, tombstoned ones included
    dim: int
    sha256: str = ""
    index_type: str = INDEX_TYPE  # stamps written before index types existed were always Flat
    tombstones: list[int] = field(default_factory=list)  # deleted ids still inside an HNSW graph


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half-written copy taking space
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VectorIndex:
    """A FAISS index of one type (see the module docstring), on the CPU, with a GPU copy when a GPU exists.

    Thread-safe: mutations and searches are serialised by one lock (FAISS indexes are not safe to mutate while
    searched). Only exact (Flat) indexes go to the GPU; its copy is re-made lazily after a change, because GPU
    flat indexes cannot remove ids. ``search_params`` (``nprobe`` or ``efSearch``) apply to every search.
    """

    def __init__(
        self,
        cpu_index,
        use_gpu: bool | None = None,
        index_type: str = INDEX_TYPE,
        search_params: dict | None = None,
        tombstones=(),
    ):
        self._cpu = cpu_index
        self.index_type = index_type
        self.family = index_family(index_type)
        self.search_params: dict = dict(search_params or {})
        self._tombstones = np.unique(np.asarray(list(tombstones), dtype="int64"))
        self._lock = threading.Lock()
        self._use_gpu = (gpu_count() > 0 if use_gpu is None else use_gpu) and self.family == "flat"
        self._gpu = None
        self._gpu_resources = None

    @classmethod
    def empty(cls, dim: int, use_gpu: bool | None = None) -> VectorIndex:
        faiss = import_faiss()
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), use_gpu=use_gpu)

    @classmethod
    def create(
        cls,
        index_type: str,
        dim: int,
        training: np.ndarray | None = None,
        search_params: dict | None = None,
        use_gpu: bool | None = None,
    ) -> VectorIndex:
        """An empty index of ``index_type`` (a resolved factory string), trained on ``training`` if it needs it."""
        faiss = import_faiss()
        cpu_index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        if index_family(index_type) == "hnsw":
            faiss.downcast_index(cpu_index.index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if not cpu_index.is_trained:
            if training is None or len(training) == 0:
                raise InvalidInputError(f"index type {index_type} must be trained on vectors, and there are none")
            ivf = faiss.try_extract_index_ivf(cpu_index)
            if ivf is not None and len(training) < ivf.nlist:
                raise InvalidInputError(
                    f"index type {index_type} needs at least {ivf.nlist} vectors to train its lists; the collection "
                    f"has {len(training)}. Use fewer lists (IVF,SQ8 picks them) or Flat."
                )
            cpu_index.train(np.ascontiguousarray(training, dtype="float32"))
        return cls(cpu_index, use_gpu=use_gpu, index_type=index_type, search_params=search_params)

    @property
    def dim(self) -> int:
        return self._cpu.d

    @property
    def ntotal(self) -> int:
        """Searchable vectors: tombstoned ones are not counted."""
        return self._cpu.ntotal - len(self._tombstones)

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    @property
    def exact(self) -> bool:
        return self.family == "flat"

    @property
    def nlist(self) -> int:
        return import_faiss().extract_index_ivf(self._cpu).nlist

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
        """Remove ``ids`` (HNSW: tombstone them); returns how many were in the index."""
        ids = np.asarray(list(ids), dtype="int64")
        if len(ids) == 0:
            return 0
        faiss = import_faiss()
        with self._lock:
            if self.family == "hnsw":
                present = ids[np.isin(ids, faiss.vector_to_array(self._cpu.id_map))]
                fresh = np.setdiff1d(present, self._tombstones)
                self._tombstones = np.union1d(self._tombstones, fresh)
                return len(fresh)
            removed = self._cpu.remove_ids(faiss.IDSelectorBatch(ids))
            self._gpu = None
        return removed

    def _parameters(self, k: int, allowed: np.ndarray | None, total: int, excluded: np.ndarray | None = None):
        """FAISS search parameters for one search: the tuned ones, an id selector, widened for a filter.

        A filter passing a fraction f of the vectors leaves about f of what ``nprobe`` lists or ``efSearch``
        candidates hold, so both grow by 1/f (capped) to keep k matches within reach.
        """
        faiss = import_faiss()
        blocked = self._tombstones if excluded is None else np.union1d(self._tombstones, excluded)
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.setdiff1d(allowed, blocked) if excluded is not None else allowed)
        elif len(blocked):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(blocked))
        else:
            selector = None
        widen = total / max(1, len(allowed)) if allowed is not None else 1.0
        # keyword construction makes the wrapper keep a reference to the selector (FAISS holds a raw pointer)
        extra = {"sel": selector} if selector is not None else {}
        if self.family == "ivf":
            nprobe = min(self.nlist, math.ceil(self.search_params.get("nprobe", 1) * widen))
            if "_HNSW" in self.index_type.split(",")[0]:
                # an HNSW coarse quantiser finds at most efSearch lists: let it find twice the lists probed
                quantiser = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
                return faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=quantiser, **extra)
            return faiss.SearchParametersIVF(nprobe=nprobe, **extra)
        if self.family == "hnsw":
            ef = max(k, self.search_params.get("efSearch", 16))
            return faiss.SearchParametersHNSW(efSearch=min(max(ef, 4096), math.ceil(ef * widen)), **extra)
        return faiss.SearchParameters(**extra)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores, ids), ids -1 where fewer than k vectors exist (or are found).

        Exact for Flat; approximate, with the tuned ``search_params``, for IVF and HNSW. ``allowed`` restricts the
        result to those ids (a metadata filter). On the CPU that is a FAISS ``IDSelector``; GPU indexes ignore
        selectors, so there :func:`filtered_search` searches exactly over the allowed vectors when they are few
        and over-fetches adaptively otherwise, never missing a match. ``excluded`` ids are left out (CPU only:
        tuning uses it to hold a query's own document out).
        """
        apply_search_threads()
        queries = np.ascontiguousarray(queries, dtype="float32")
        n = len(queries)
        with self._lock:
            total = self.ntotal
            if allowed is not None and len(self._tombstones):
                allowed = np.setdiff1d(np.asarray(allowed, dtype="int64"), self._tombstones)
            limit = total if allowed is None else min(total, len(allowed))
            if limit == 0:
                return np.full((n, 1), -np.inf, dtype="float32"), np.full((n, 1), -1, dtype="int64")
            k = max(1, min(k, limit))
            if allowed is not None:
                allowed = np.asarray(allowed, dtype="int64")
            if not self._use_gpu or excluded is not None:
                if allowed is None and excluded is None and not len(self._tombstones) and self.family == "flat":
                    return self._cpu.search(queries, k)
                return self._cpu.search(queries, k, params=self._parameters(k, allowed, total, excluded))
            if allowed is None:
                # GPU flat search takes k <= 2048; deeper searches run on the CPU copy
                searcher = self._cpu if k > GPU_MAX_K else self._searcher()
                return searcher.search(queries, k)
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

    def ids(self) -> np.ndarray:
        """The ids this index can return, sorted, tombstoned ones left out (an id held twice appears twice).

        >>> index.ids().tolist()
        [7, 9]
        """
        faiss = import_faiss()
        with self._lock:
            if self.family == "ivf":
                lists = faiss.extract_index_ivf(self._cpu).invlists
                held = [
                    faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                    for i in range(lists.nlist)
                    if lists.list_size(i)
                ]
                found = np.concatenate(held) if held else np.empty(0, "int64")
            else:
                found = faiss.vector_to_array(self._cpu.id_map)
            found = found[~np.isin(found, self._tombstones)]
        return np.sort(found.astype("int64"))

    def stamp(self, max_passage_id: int, deletion_seq: int) -> Stamp:
        """The stamp of this index once it holds every passage <= ``max_passage_id`` and deletion <= the seq."""
        with self._lock:
            return Stamp(
                max_passage_id,
                deletion_seq,
                self._cpu.ntotal,
                self.dim,
                index_type=self.index_type,
                tombstones=self._tombstones.tolist(),
            )

    def serialize(self) -> bytes:
        """The CPU index as FAISS writes it (what ``index.faiss`` holds)."""
        faiss = import_faiss()
        with self._lock:
            return faiss.serialize_index(self._cpu).tobytes()

    def save(self, directory: Path, stamp: Stamp) -> Stamp:
        """Write ``index.faiss`` then ``index.json`` atomically; returns the stamp with the file's sha256."""
        data = self.serialize()
        stamp = Stamp(**{**asdict(stamp), "sha256": hashlib.sha256(data).hexdigest()})
        _write_atomically(directory / "index.faiss", data)
        _write_atomically(directory / "index.json", json.dumps(asdict(stamp), indent=2).encode())
        return stamp

    @classmethod
    def load(
        cls,
        directory: Path,
        dim: int,
        use_gpu: bool | None = None,
        index_type: str = INDEX_TYPE,
        search_params: dict | None = None,
    ) -> tuple[VectorIndex, Stamp] | None:
        """The checkpoint in ``directory``, or None (with a log line) when it is missing, damaged or foreign.

        A checkpoint of another index type than ``index_type`` (the manifest's) is foreign: an ``optimize``
        that crashed between writing the file and recording the new type in the manifest leaves one.
        """
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
        if stamp.index_type != index_type:
            log.warning(
                "index file %s is %s but the manifest says %s; rebuilding from SQLite",
                index_path,
                stamp.index_type,
                index_type,
            )
            return None
        faiss = import_faiss()
        cpu_index = faiss.deserialize_index(np.frombuffer(data, dtype="uint8"))
        if cpu_index.d != dim or cpu_index.ntotal != stamp.ntotal:
            log.warning("index file %s does not match its stamp or the manifest; rebuilding from SQLite", index_path)
            return None
        index = cls(cpu_index, use_gpu, index_type, search_params, stamp.tombstones)
        return index, stamp
