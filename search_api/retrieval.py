"""From a query to ranked results: dense, lexical or hybrid, filtered, per passage or per document, paged.

Used by the HTTP service and by the CLI's in-process search and eval, so both rank identically.
Hybrid search fuses the dense and lexical lists by reciprocal rank fusion (``rrf``) or by min-max normalised
scores (``minmax``, weighted by ``alpha`` towards dense), never by adding raw scores of different scales.

>>> retriever = Retriever(collection, encoder)
>>> retriever.search(SearchOptions(query="what is faiss", k=5, mode="hybrid", filter={"year": {"$gte": 2020}}))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from indexer.encoder import Encoder
from indexer.settings import ServerSettings
from storage.collection import Collection, Hit
from storage.errors import InvalidInputError, PayloadTooLargeError
from storage.inputs import lone_surrogate

RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion
# Measured on msmarco and dbpedia (docs/quality.md): min-max beats RRF on both; alpha 0.8 is best on msmarco and
# within 0.01 of the best on dbpedia, while keeping enough lexical weight to gain on scifact.
DEFAULT_FUSION = "minmax"
DEFAULT_ALPHA = 0.8
# Hybrid lists are fused from at least this many candidates each, whatever the page, so that the first
# FUSION_DEPTH results rank the same on every page; deeper pages fuse deeper lists.
FUSION_DEPTH = 100
MAX_CANDIDATES = 10_000  # most passages one search ranks, however large k, offset and grouping


@dataclass(frozen=True)
class SearchOptions:
    query: str
    k: int = 10
    mode: str = "dense"  # dense | lexical | hybrid
    filter: dict | None = None
    fusion: str = DEFAULT_FUSION  # rrf | minmax
    alpha: float = DEFAULT_ALPHA  # minmax: weight of the dense score
    group_by: str = "passage"  # passage | document
    passages_per_document: int = 1
    offset: int = 0


def check_k(k: int, limits: ServerSettings) -> None:
    """Refuse a k outside 1..``limits.max_k``: the same rule over HTTP and in the CLI.

    >>> check_k(10, ServerSettings())
    """
    if not 1 <= k <= limits.max_k:
        raise InvalidInputError(f"k is {k}; it must be between 1 and {limits.max_k}")


def check_query(query: str, limits: ServerSettings) -> None:
    """Refuse an empty query or one over ``limits.max_query_chars``: the same rule over HTTP and in the CLI.

    >>> check_query("what is faiss", ServerSettings())
    """
    if not query.strip():
        raise InvalidInputError("query is empty; send some text to search for")
    if problem := lone_surrogate(query, "query"):
        raise InvalidInputError(f"{problem}; send valid Unicode")
    if len(query) > limits.max_query_chars:
        raise InvalidInputError(f"query has {len(query)} characters; the limit is {limits.max_query_chars}")


def check_response_size(queries: int, options: SearchOptions, limits: ServerSettings) -> None:
    """Refuse, before any work, a request whose response could carry more than ``limits.max_response_hits``
    results (the CLI's eval sizes its batches by it).

    >>> check_response_size(64, SearchOptions(query="", k=100), ServerSettings())
    """
    per_result = options.passages_per_document if options.group_by == "document" else 1
    asked = queries * options.k * per_result
    if asked > limits.max_response_hits:
        shape = f"{queries} queries x k={options.k}" + (f" x {per_result} passages_per_document" * (per_result > 1))
        raise PayloadTooLargeError(
            f"this request may return {asked} results ({shape}); the limit is {limits.max_response_hits} "
            "(server.max_response_hits): send fewer queries per batch, a smaller k or fewer passages_per_document"
        )


@dataclass
class Result:
    """A ranked passage, or for ``group_by='document'`` a document by its best passage (and its next best)."""

    hit: Hit
    score: float
    passages: list[Hit] = field(default_factory=list)


def rrf(lists: list[list[Hit]], weights: list[float] | None = None) -> list[tuple[Hit, float]]:
    """Reciprocal rank fusion: score(p) = sum over lists of weight / (60 + rank)."""
    scores: dict[int, float] = {}
    hits: dict[int, Hit] = {}
    for ranked, weight in zip(lists, weights or [1.0] * len(lists)):
        for rank, hit in enumerate(ranked, start=1):
            scores[hit.passage_id] = scores.get(hit.passage_id, 0.0) + weight / (RRF_K + rank)
            hits.setdefault(hit.passage_id, hit)
    return sorted(((hits[p], s) for p, s in scores.items()), key=lambda pair: -pair[1])


def minmax(dense: list[Hit], lexical: list[Hit], alpha: float) -> list[tuple[Hit, float]]:
    """alpha * normalised dense score + (1 - alpha) * normalised lexical score; absent from a list counts 0."""

    def normalised(ranked: list[Hit]) -> dict[int, float]:
        if not ranked:
            return {}
        values = [h.score for h in ranked]
        low, high = min(values), max(values)
        span = high - low
        return {h.passage_id: (h.score - low) / span if span > 0 else 1.0 for h in ranked}

    d, lx = normalised(dense), normalised(lexical)
    hits = {h.passage_id: h for h in [*dense, *lexical]}
    fused = {p: alpha * d.get(p, 0.0) + (1 - alpha) * lx.get(p, 0.0) for p in hits}
    return sorted(((hits[p], s) for p, s in fused.items()), key=lambda pair: -pair[1])


class Retriever:
    def __init__(self, collection: Collection, encoder: Encoder | None, observe_encode=None):
        self.collection = collection
        self.encoder = encoder
        self._observe = observe_encode or (lambda seconds, texts: None)

    def _encode_queries(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = self.encoder.encode_queries(texts)
        self._observe(time.perf_counter() - started, len(texts))
        return vectors

    def _check(self, options: SearchOptions) -> None:
        if options.mode not in ("dense", "lexical", "hybrid"):
            raise InvalidInputError(f"mode {options.mode!r} is unknown; use dense, lexical or hybrid")
        if options.fusion not in ("rrf", "minmax"):
            raise InvalidInputError(f"fusion {options.fusion!r} is unknown; use rrf or minmax")
        if not 0.0 <= options.alpha <= 1.0:
            raise InvalidInputError(f"alpha is {options.alpha}; it must be between 0 and 1")

    def search(self, options: SearchOptions) -> list[Result]:
        return self.search_many([options])[0]

    def search_many(self, batch: list[SearchOptions]) -> list[list[Result]]:
        """Several searches; their dense queries are encoded in one batch."""
        for options in batch:
            self._check(options)
        dense = [o for o in batch if o.mode != "lexical"]
        vectors = iter(self._encode_queries([o.query for o in dense]) if dense else [])
        return [self._run(o, next(vectors) if o.mode != "lexical" else None) for o in batch]

    def similar(self, options: SearchOptions, document_id: str | None = None) -> list[Result]:
        """Nearest neighbours of a stored document (its passage vectors, averaged; no re-encode) or of a text
        (encoded as a passage). The document itself is left out."""
        if document_id is not None:
            vector = self.collection.passage_vectors(document_id).mean(axis=0)
        else:
            vector = self.encoder.encode_passages([options.query])[0]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        options = replace(options, mode="dense")
        return self._run(options, vector, exclude=document_id)

    def _ranked(self, options: SearchOptions, vector: np.ndarray | None, m: int) -> list[tuple[Hit, float]]:
        dense = self.collection.search(vector[None, :], m, options.filter)[0] if vector is not None else []
        if options.mode == "dense":
            return [(h, h.score) for h in dense]
        lexical = self.collection.search_lexical(options.query, m, options.filter)
        if options.mode == "lexical":
            return [(h, h.score) for h in lexical]
        fused = rrf([dense, lexical]) if options.fusion == "rrf" else minmax(dense, lexical, options.alpha)
        return fused[:m]

    def _ranked_at_depth(self, options: SearchOptions, vector: np.ndarray | None, m: int):
        depth = max(m, FUSION_DEPTH) if options.mode == "hybrid" else m
        return self._ranked(options, vector, depth)[:m]

    def _run(self, options: SearchOptions, vector: np.ndarray | None, exclude: str | None = None) -> list[Result]:
        wanted = options.offset + options.k
        ceiling = max(1, min(self.collection.index_size, MAX_CANDIDATES))
        if options.group_by == "passage":
            m = min(wanted, ceiling)
            while True:
                ranked = [(h, s) for h, s in self._ranked_at_depth(options, vector, m) if h.document_id != exclude]
                if len(ranked) >= wanted or m >= ceiling:
                    break
                m = min(ceiling, m * 4)
            return [Result(h, s) for h, s in ranked[options.offset : wanted]]
        per_doc = options.passages_per_document
        m = min(max(wanted * per_doc * 2, 20), ceiling)
        while True:
            ranked = self._ranked_at_depth(options, vector, m)
            groups: dict[str, Result] = {}
            for hit, score in ranked:
                if hit.document_id == exclude:
                    continue
                group = groups.get(hit.document_id)
                if group is None:
                    groups[hit.document_id] = Result(hit, score, [hit])
                elif len(group.passages) < per_doc:
                    group.passages.append(hit)
            exhausted = len(ranked) < m or m >= ceiling
            if len(groups) >= wanted or exhausted:
                break
            m = min(ceiling, m * 4)
        return list(groups.values())[options.offset : wanted]
