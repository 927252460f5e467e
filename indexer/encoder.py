"""The encoder: a sentence-transformers model with its MRL head chosen, encoding passages and queries as Stella does.

Prompt types follow the Stella model card. ``s2p`` (retrieval, the default): queries get the model's
``s2p_query`` prompt, passages none. ``s2s`` (similar text): both sides get ``s2s_query``. Prompts come from the
model's own ``config_sentence_transformers.json``; a model without them (MiniLM) gets none.

>>> encoder = Encoder.load("minilm")
>>> encoder.encode_queries(["what is faiss?"]).shape
(1, 384)
"""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.models import HeadChoice, ModelProfile, default_head, model_folder, resolve_profile, select_head
from indexer.onnx_backend import cpu_session, graph_path
from indexer.settings import Settings, embedding_cache_dir, onnx_dir
from storage.collection import Manifest
from storage.errors import InvalidInputError, ModelUnavailableError
from storage.vector_index import set_search_threads

if TYPE_CHECKING:
    from indexer.onnx_backend import Int8Recipe

log = logging.getLogger(__name__)

# texts tokenised at once by a token-budget encode (each window padded to its longest: 4096 x 512 int64 x 3 is
# 50 MB); batches are length-sorted within a window
TOKENISE_WINDOW = 4096
# CUDA batches stop growing where padding would pass 3%, once they hold 4,096 real tokens. The GPU page measured
# 8,192-token batches (16 x 512) at 45% MFU against 49% at 128 x 512; 4,096 is not measured yet (bench_gpu's
# real-length rows will show whether small batches cost more than the padding they save; 8,192 pads 5.2%).
# Simulated on the chunked corpora with MiniLM's tokenizer, 2,000 documents, budget 128 x 512: padding 23.9% ->
# 3.8% on msmarco, 6.3% -> 2.8% on scifact. The CPU (ONNX) cut is left as it is: int8 activation scales are
# per batch, so a new cut there would need its quality measured again.
CUDA_MIN_BATCH_TOKENS = 4096
CUDA_MAX_PADDING = 0.03
PROMPT_NAMES = {"s2p": ("s2p_query", None), "s2s": ("s2s_query", "s2s_query")}


def configure_search_threads(settings: Settings, device: str | None = None) -> int:
    """Give FAISS one OpenMP thread when the encoder runs on the same CPU cores (unless set explicitly).

    ``device`` is where the encoder runs (default: ``processing.device``, resolved). Two OpenMP runtimes (torch's
    and faiss's) spinning on 2 cores made a single query 15 ms instead of 7 ms; a flat search of one query gains
    nothing from a thread team anyway.
    """
    threads = settings.processing.faiss_threads
    if threads is None:
        on_cpu = (device or resolve_device(settings.processing.device)) == "cpu"
        threads = 1 if on_cpu else (os.cpu_count() or 1)
    set_search_threads(threads)
    return threads


def resolve_backend(settings: Settings, profile: ModelProfile) -> str:
    """The configured backend, with ``auto`` made concrete for ``profile``.

    ``auto`` is ``onnx-int8`` on the CPU for a model whose int8 passage vectors were measured within the quality
    bound (``ModelProfile.int8_validated``: the embedded MiniLM) when ONNX Runtime is installed; otherwise
    ``torch`` (CUDA, and the Stella models, whose weights are not here to validate int8 on).
    """
    backend = settings.encoder.backend
    if backend != "auto":
        return backend
    if not profile.int8_validated or resolve_device(settings.processing.device) != "cpu":
        return "torch"
    return "onnx-int8" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def backend_for_precision(precision: str, settings: Settings, profile: ModelProfile) -> str:
    """The backend that writes passage vectors of ``precision`` (a collection's), given the configured one.

    On the CPU a collection's passages keep the precision it was created with: an fp32 collection (or a bf16 one
    from a GPU) gets fp32 ONNX where ``onnx-int8`` is configured (or ``auto`` picks it), an int8 one gets
    ``onnx-int8``. On CUDA the torch model runs in bf16 (fp16 where bf16 is unsupported) whatever the collection
    holds: there is no int8 path there, and an fp32 forward would give up the GPU's speed. ``encoder_for_manifest``
    logs such a mix.
    """
    backend = resolve_backend(settings, profile)
    int8 = precision.startswith("int8")
    if not int8 and backend == "onnx-int8":
        return "onnx"
    if int8 and backend != "onnx-int8" and resolve_device(settings.processing.device) == "cpu":
        return "onnx-int8"
    return backend


def encoder_precision_key(precision: str) -> str:
    """The part of a collection's precision that decides which encoder it needs: each int8 recipe apart, and fp32,
    bf16 and fp16 together (on one machine they get the same model: bf16 on CUDA, fp32 on the CPU)."""
    return precision if precision.startswith("int8") else "full"


def _torch_precision(model) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the dtype of a torch model's weights."""
    import torch

    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda:0`` when CUDA is available, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"processing.device is {device!r} but CUDA is not available here; use auto or cpu")
    return device


@dataclass
class EncodeStats:
    """Running totals, for logs, metrics and benchmarks."""

    texts: int = 0
    batches: int = 0
    seconds: float = 0.0
    oom_backoffs: int = 0
    tokens: int = 0  # real tokens the model ran on
    padded_tokens: int = 0  # tokens it computed, padding included

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


class Encoder:
    """Turns passages and queries into normalised vectors of the collection's dimension."""

    def __init__(self, model, profile: ModelProfile, head: HeadChoice, settings: Settings, device: str):
        self.model = model
        self.profile = profile
        self.head = head
        self.settings = settings
        self.device = device
        self.prompt_type = settings.encoder.prompt_type
        prompts = getattr(model, "prompts", {}) or {}
        query_name, passage_name = PROMPT_NAMES[self.prompt_type]
        self.query_prompt: str | None = prompts.get(query_name) or None
        self.passage_prompt: str | None = prompts.get(passage_name) or None if passage_name else None
        self.stats = EncodeStats()
        # one forward pass at a time: a long bulk encode yields between batches, so queries interleave
        self._forward_lock = threading.Lock()
        self._onnx = self._onnx_bulk = None
        if settings.encoder.backend in ("onnx", "onnx-int8"):
            if not device.startswith("cpu"):
                raise InvalidInputError(
                    f"encoder.backend {settings.encoder.backend!r} runs on the CPU; use the torch backend on CUDA"
                )
            import torch

            from indexer.onnx_backend import OnnxForward

            exports, threads = onnx_dir(settings), torch.get_num_threads()
            self._onnx = OnnxForward.for_model(model, exports, self._graph_fingerprint(), threads)
            self._onnx_bulk = self._onnx
            if self.int8 is not None:
                # int8 for bulk passage encodes only: queries are few and short, and keeping them in fp32
                # leaves the quantisation error on one side of each similarity instead of both
                self._onnx_bulk = OnnxForward.for_model(
                    model, exports, self._graph_fingerprint(), threads, int8=self.int8
                )
        self._cuda_budget_cap = 0  # set by an out-of-memory back-off
        # CUDA: texts are tokenised on a worker thread ahead of the GPU (see _tokenised_windows, prefetch_passages)
        self._tokenise_ahead = device.startswith("cuda")
        self._tokeniser: ThreadPoolExecutor | None = None
        self._prefetched: tuple[list[str], str | None, Future] | None = None
        self.compile_seconds = 0.0  # compiling and warming up the forward (encoder.compile)
        self._cache = None
        if settings.embedding.cache_embeddings:
            from indexer.embedding_cache import EmbeddingCache

            self._cache = EmbeddingCache(embedding_cache_dir(settings), self.fingerprint)

    @classmethod
    def load(cls, model: str | None = None, settings: Settings | None = None, dim: int | None = None) -> Encoder:
        """Load ``model`` (a profile or folder; default ``settings.encoder.model``) at ``dim`` dimensions."""
        import torch
        from sentence_transformers import SentenceTransformer

        settings = settings or Settings()
        profile = resolve_profile(model or settings.encoder.model)
        requested_backend = settings.encoder.backend
        if settings.encoder.backend == "auto":
            settings = settings.model_copy(deep=True)
            settings.encoder.backend = resolve_backend(settings, profile)
        if settings.encoder.compile != "off" and settings.encoder.backend != "torch":
            if requested_backend != "auto":
                raise InvalidInputError(
                    f"encoder.compile applies to the torch backend, not {settings.encoder.backend!r} (ONNX "
                    "Runtime): set encoder.backend to torch, or compile to off"
                )
            # one config for GPU and CPU machines: auto picked ONNX Runtime here, which has nothing to compile
            log.info(
                "encoder.compile %s skipped: backend auto is %s here",
                settings.encoder.compile,
                settings.encoder.backend,
            )
            settings = settings.model_copy(deep=True)
            settings.encoder.compile = "off"
        folder = model_folder(profile)
        device = resolve_device(settings.processing.device)
        config_kwargs = dict(profile.cpu_config_kwargs) if not _xformers_on(device) else {}
        started = time.perf_counter()
        try:
            st_model = SentenceTransformer(
                str(folder),
                device=device,
                trust_remote_code=profile.trust_remote_code,
                local_files_only=True,
                config_kwargs=config_kwargs or None,
            )
        except OSError as exc:
            raise ModelUnavailableError(f"cannot load model {profile.model_id} from {folder}: {exc}") from exc
        head = select_head(
            folder, _native_dim(st_model), dim if dim is not None else settings.encoder.embedding_dimension
        )
        _use_head(st_model, folder, head, profile)
        st_model.max_seq_length = min(settings.encoder.max_length, st_model.max_seq_length or 512)
        if device.startswith("cuda"):
            st_model.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        st_model.eval()
        log.info(
            "loaded %s (%s) on %s in %.1fs: head %s, max %d tokens",
            profile.name,
            profile.model_id,
            device,
            time.perf_counter() - started,
            head.label,
            st_model.max_seq_length,
        )
        encoder = cls(st_model, profile, head, settings, device)
        if settings.encoder.compile != "off":
            encoder._compile_forward(settings.encoder.compile)
        return encoder

    def _compile_forward(self, backend: str) -> None:
        """Compile the transformer's forward with ``torch.compile`` (dynamic shapes), then warm it up.

        Length-sorted token-budget batches change shape from batch to batch, so the forward is compiled with
        symbolic batch and sequence sizes: one compilation serves them all, plus one for single-text batches
        (torch specialises on size 1), which the warm-up also triggers, so that the first request after a load
        does not wait for a compile (every load compiles again). On the GPU machine a static-shape compile of the
        1.5B shape's causal forward alone took 39 s and lifted it from 47% to 62% MFU (a separate experiment);
        this path (dynamic shapes, bidirectional, end to end) is what ``scripts/bench_gpu.py``'s compiled rows
        measure, not yet run.
        """
        import torch

        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise InvalidInputError(
                f"encoder.compile {backend!r} is not a torch.compile backend: use off or one of {', '.join(backends)}"
            )
        transformer = getattr(self.model[0], "auto_model", None)
        if transformer is None:
            raise InvalidInputError(f"encoder.compile: model {self.profile.model_id} has no transformer module")
        # ST calls the transformer's ``forward`` directly, so the compiled function replaces that attribute
        transformer.forward = torch.compile(transformer.forward, dynamic=True, backend=backend)
        started = time.perf_counter()
        warm = "warm up the compiled forward " * 4
        self._encode_uncached([warm, warm + warm], self.passage_prompt, bulk=True)
        self._encode_uncached([warm], self.query_prompt, bulk=False)
        self.stats = EncodeStats()
        self.compile_seconds = time.perf_counter() - started
        log.info("compiled the forward (%s) and warmed it up in %.1fs", backend, self.compile_seconds)

    # -- what a collection records --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.head.dim

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @functools.cached_property
    def chunk_tokenizer(self):
        """A copy of the tokenizer for chunking. A fast tokenizer keeps its padding and truncation settings in
        one shared Rust object, so chunking (no padding) on one thread while a batch is tokenised for the model
        (padding) on another broke the batch ("expected sequence of length 138 ... got 112"): the pipelined
        ingest chunks the next batch while this one encodes, and the server chunks upserts while it encodes
        queries."""
        return copy.deepcopy(self.model.tokenizer)

    @property
    def int8(self) -> Int8Recipe | None:
        """The int8 quantisation recipe of the ``onnx-int8`` backend; None for full-precision vectors."""
        if self.settings.encoder.backend != "onnx-int8":
            return None
        from indexer.onnx_backend import Int8Recipe

        return Int8Recipe(keep_fp32=tuple(self.settings.encoder.int8_keep_fp32))

    @property
    def precision(self) -> str:
        """How this encoder computes passage vectors, as a collection records it: ``fp32``, ``bf16`` or ``fp16``
        (the torch model on CUDA), or ``int8-<recipe key>`` (``onnx-int8``)."""
        if self.int8 is not None:
            return f"int8-{self.int8.key}"
        if self._onnx is not None:
            return "fp32"
        return _torch_precision(self.model)

    @property
    def fingerprint(self) -> str:
        """Identifies the vectors this encoder computes: keys the embedding cache (so vectors of one precision are
        never handed to an encoder of another)."""
        if self.precision == "fp32":
            return self._graph_fingerprint()
        return hashlib.sha256(f"{self._graph_fingerprint()}\x1f{self.precision}".encode()).hexdigest()[:16]

    def _graph_fingerprint(self) -> str:
        return graph_fingerprint(
            self.profile, self.head.label, self.settings.encoder.normalize_embeddings, self.max_seq_length
        )

    def manifest(self) -> Manifest:
        return Manifest(
            model=self.profile.name,
            model_id=self.profile.model_id,
            revision=self.profile.revision,
            dim=self.dim,
            head=self.head.label,
            prompt_type=self.prompt_type,
            max_length=self.max_seq_length,
            normalized=self.settings.encoder.normalize_embeddings,
            precision=self.precision,
        )

    # -- encoding -------------------------------------------------------------------------------------------

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Vectors for search queries (with the query prompt of the prompt type)."""
        return self.encode(texts, self.query_prompt, bulk=False)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """Vectors for stored passages (bare for ``s2p``, with ``s2s_query`` for ``s2s``)."""
        return self.encode(texts, self.passage_prompt)

    def encode(self, texts: list[str], prompt: str | None = None, bulk: bool = True) -> np.ndarray:
        """Encode ``texts`` (prompt prepended) in length-sorted batches; float32, shape (len(texts), dim).

        ``bulk`` encodes run the seed's housekeeping (CUDA cache clearing, forced GC) every N batches; query
        encodes skip it, since a full GC every 50 queries showed up as a 180 ms p99 in serving.
        """
        out = np.empty((len(texts), self.dim), dtype="float32")
        if not texts:
            return out
        todo = list(range(len(texts)))
        cache = self._cache if bulk else None  # passages only: queries are not written to disk
        if cache is not None:
            cached = cache.get([(prompt or "") + t for t in texts])
            for i, vector in cached.items():
                out[i] = vector
            todo = [i for i in todo if i not in cached]
        if todo:
            uncached = texts if len(todo) == len(texts) else [texts[i] for i in todo]  # the caller's list: prefetch
            vectors = self._encode_uncached(uncached, prompt, bulk)
            out[todo] = vectors
            if cache is not None:
                cache.put([(prompt or "") + texts[i] for i in todo], vectors)
        return out

    def _encode_uncached(self, texts: list[str], prompt: str | None, bulk: bool) -> np.ndarray:
        started = time.perf_counter()
        out = np.empty((len(texts), self.dim), dtype="float32")
        budget = self._token_budget() if bulk else 0
        if budget:
            self._encode_by_token_budget(texts, prompt, out, budget)
        else:
            self._encode_by_batch_size(texts, prompt, bulk, out)
        self.stats.texts += len(texts)
        self.stats.seconds += time.perf_counter() - started
        return out

    def _encode_by_batch_size(self, texts: list[str], prompt: str | None, bulk: bool, out: np.ndarray) -> None:
        """Fixed-size batches of length-sorted texts, halved on CUDA out-of-memory."""
        import torch

        order = np.argsort([-len(t) for t in texts], kind="stable")
        batch_size = self.settings.encoder.batch_size
        start = 0
        while start < len(texts):
            idx = order[start : start + batch_size]
            try:
                out[idx] = self._embed(self.model.preprocess([texts[i] for i in idx], prompt=prompt), bulk)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                self.stats.oom_backoffs += 1
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with batch size %d", batch_size)
                continue
            start += len(idx)
            self._batch_done(bulk)

    def _token_budget(self) -> int:
        """Padded tokens per bulk batch, 0 for fixed batches of ``batch_size`` (torch on the CPU, the seed's way).

        ONNX Runtime: ``encoder.max_batch_tokens``. CUDA: ``batch_size`` texts of the full window, the memory a
        fixed batch of the longest texts takes, so that batches of short passages hold many more of them.
        """
        if self._onnx is not None:
            return self.settings.encoder.max_batch_tokens
        if self.device.startswith("cuda"):
            budget = self.settings.encoder.batch_size * self.max_seq_length
            return min(budget, self._cuda_budget_cap or budget)
        return 0

    def _encode_by_token_budget(self, texts: list[str], prompt: str | None, out: np.ndarray, budget: int) -> None:
        """Length-sorted batches of at most ``budget`` padded tokens (ONNX Runtime, CUDA).

        Short passages then run in large batches and long ones in small, so little of each batch is padding;
        the order of ``out`` is the order of ``texts``. Each window of texts is tokenised once, padded to its
        longest, and each batch is cut from it at its own longest length. On CUDA out-of-memory the budget
        halves and the window's remaining texts are cut again.

        torch (CUDA): windows are tokenised on a worker thread, into pinned memory, ahead of the GPU (the next
        window while this one runs; the first one while the previous call ran, where the caller asked with
        ``prefetch_passages``); each window's tokens are copied to the device once and its batches cut there; its
        vectors stay on the device until the window ends, so the encoder itself waits for the GPU once per window
        (the model's own code may wait more: transformers' eager SDPA mask checks the padding on the host).
        """
        for first, features in self._tokenised_windows(texts, prompt):
            budget = self._encode_window(first, features, out, budget)

    def _encode_window(self, first: int, features: dict, out: np.ndarray, budget: int) -> int:
        """One tokenised window's texts into ``out[first:]``, in batches of at most ``budget`` padded tokens;
        the budget it ended with (halved on each CUDA out-of-memory), for the next window."""
        import torch

        on_device = self._onnx is None
        device = self.model.device if on_device else None
        left = self.tokenizer.padding_side == "left"
        mask = features["attention_mask"]
        lengths = mask.sum(dim=1).numpy()
        n = mask.shape[0]
        if on_device:
            features = {
                name: value.to(device, non_blocking=True) if _per_text(value, n) else value
                for name, value in features.items()
            }
            vectors = torch.empty((n, self.dim), dtype=torch.float32, device=device)
        pending = self._budget_batches(lengths, budget)
        while pending:
            idx = pending[0]
            width = int(lengths[idx].max())
            columns = slice(mask.shape[1] - width, None) if left else slice(0, width)
            batch = None
            try:  # the device-side cut allocates too: inside, so that its out-of-memory backs off as well
                rows = torch.from_numpy(idx).to(device, non_blocking=True) if on_device else idx
                batch = {name: _rows(value, rows, columns, n) for name, value in features.items()}
                if on_device:
                    vectors[rows] = self._forward(batch)
                else:
                    out[first + idx] = self._embed(batch, bulk=True)
                out_of_memory = False
            except torch.cuda.OutOfMemoryError:
                if len(idx) == 1:
                    raise
                out_of_memory = True
            del batch
            if out_of_memory:  # outside the except block: its traceback no longer pins the failed batch
                budget = max(1, budget // 2)
                self._cuda_budget_cap = budget  # later calls start where this one backed off to
                self.stats.oom_backoffs += 1
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with batches of at most %d tokens", budget)
                rest = np.concatenate(pending)
                pending = [rest[b] for b in self._budget_batches(lengths[rest], budget)]
                continue
            if on_device:  # _embed counts the host path's tokens
                self.stats.tokens += int(lengths[idx].sum())
                self.stats.padded_tokens += len(idx) * width
            pending.pop(0)
            self._batch_done(bulk=True)
        if on_device:
            out[first : first + n] = vectors.cpu().numpy()  # the one wait for the GPU per window
        return budget

    def prefetch_passages(self, texts: list[str]) -> None:
        """Start tokenising the first window of ``texts`` for a later ``encode_passages(texts)`` (the same list
        object) on the encoder's worker thread, where texts are tokenised ahead (CUDA); a no-op elsewhere. The
        pipelined ingest calls it for the next commit batch while this one encodes, so that a call of fewer
        texts than one window does not leave the GPU waiting for its tokenisation."""
        if self._tokenise_ahead and texts:
            prompt = self.passage_prompt
            self._prefetched = (texts, prompt, self._tokenise_later(texts, prompt, 0))

    def _tokenise_later(self, texts: list[str], prompt: str | None, first: int) -> Future:
        if self._tokeniser is None:
            self._tokeniser = ThreadPoolExecutor(1, thread_name_prefix="encode-tokenise")
        return self._tokeniser.submit(self._tokenise_window, texts, prompt, first, True)

    def _tokenise_window(self, texts: list[str], prompt: str | None, first: int, pin: bool) -> dict:
        import torch

        features = self.model.preprocess(texts[first : first + TOKENISE_WINDOW], prompt=prompt)
        if pin and self.device.startswith("cuda"):  # off the critical path: on the worker only
            features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        return features

    def _tokenised_windows(self, texts: list[str], prompt: str | None) -> Iterator[tuple[int, dict]]:
        """``(first, features)`` for each window of ``TOKENISE_WINDOW`` texts. Where texts are tokenised ahead,
        the worker tokenises the next window while the caller encodes this one (the fast tokenizer releases
        the GIL), and the first comes from ``prefetch_passages`` when it was asked for these texts."""
        starts = range(0, len(texts), TOKENISE_WINDOW)
        prefetched, self._prefetched = self._prefetched, None
        upcoming = None
        if prefetched is not None and prefetched[0] is texts and prefetched[1] == prompt:
            upcoming = prefetched[2]
        for i, first in enumerate(starts):
            features = upcoming.result() if upcoming is not None else self._tokenise_window(texts, prompt, first, False)
            upcoming = None
            if self._tokenise_ahead and i + 1 < len(starts):
                upcoming = self._tokenise_later(texts, prompt, starts[i + 1])
            yield first, features

    def token_budget_batches(self, texts: list[str], prompt: str | None = None) -> list[np.ndarray]:
        """Indices into ``texts``, longest first, cut into batches of at most ``max_batch_tokens`` padded tokens.

        >>> encoder.settings.encoder.max_batch_tokens = 300
        >>> [list(b) for b in encoder.token_budget_batches(["short", "a long passage " * 50, "short too"])]
        [[1], [2, 0]]
        """
        return self._budget_batches(np.array(self._token_lengths(texts, prompt)))

    def _budget_batches(self, lengths: np.ndarray, budget: int | None = None) -> list[np.ndarray]:
        budget = budget or self.settings.encoder.max_batch_tokens
        if self.device.startswith("cuda"):
            return padding_capped_batches(lengths, budget, CUDA_MIN_BATCH_TOKENS, CUDA_MAX_PADDING)
        # ONNX: every batch filled to the budget (a batch never holds `budget` real tokens before it is full, so
        # the cap never applies): the cut int8's quality was measured with
        return padding_capped_batches(lengths, budget, min_tokens=budget, max_padding=0.0)

    def _token_lengths(self, texts: list[str], prompt: str | None) -> list[int]:
        prefixed = [(prompt or "") + t for t in texts]
        ids = self.tokenizer(prefixed, truncation=True, max_length=self.max_seq_length)["input_ids"]
        return [len(i) for i in ids]

    def _batch_done(self, bulk: bool) -> None:
        """Count a batch; bulk encodes run the seed's housekeeping (CUDA cache, forced GC) every N batches."""
        import torch

        self.stats.batches += 1
        if not bulk:
            return
        processing = self.settings.processing
        if (
            self.device.startswith("cuda")
            and processing.clear_cache_interval
            and self.stats.batches % processing.clear_cache_interval == 0
        ):
            torch.cuda.empty_cache()
        if processing.force_gc_interval and self.stats.batches % processing.force_gc_interval == 0:
            gc.collect()

    def _embed(self, features: dict, bulk: bool) -> np.ndarray:
        """One forward pass over tokenised ``features`` on the host; the head's truncation and normalisation
        applied; the vectors as float32 on the host."""
        import torch
        from sentence_transformers.util import batch_to_device

        mask = features.get("attention_mask")
        counts = (int(mask.sum()), mask.numel()) if mask is not None else (0, 0)  # on the host, before the copy
        if self._onnx is not None:
            forward = self._onnx_bulk if bulk else self._onnx
            with self._forward_lock:
                raw = forward(features)
            embeddings = self._finish(torch.from_numpy(raw))
        else:
            embeddings = self._forward(batch_to_device(features, self.model.device))
        self.stats.tokens += counts[0]  # a batch that ran out of memory is not counted
        self.stats.padded_tokens += counts[1]
        return embeddings.cpu().numpy()

    def _forward(self, features: dict):
        """The torch model on ``features`` already on its device; the vectors stay there (float32)."""
        import torch

        with self._forward_lock, torch.inference_mode():
            return self._finish(self.model(features)["sentence_embedding"])

    def _finish(self, embeddings):
        """The head's truncation (a dim with no head of its own) and normalisation, in float32."""
        import torch

        if self.head.truncate:
            embeddings = embeddings[:, : self.head.dim]
        embeddings = embeddings.float()
        if self.settings.encoder.normalize_embeddings:
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        return embeddings


class OnnxQueryEncoder:
    """Query vectors of a collection from the cached fp32 ONNX export of its model and head, tokenised with the
    model's own ``tokenizer.json`` and prompted from its ``config_sentence_transformers.json``: neither torch nor
    sentence-transformers is imported, so a one-off search (the CLI's) or a server start skips the seconds those
    imports and the model load take (``scripts/bench_startup.py`` measures both).

    The vectors are the full :class:`Encoder`'s query vectors (the same graph, tokens and batches; the tests
    check 1e-5). It encodes queries only: writing passages needs the full encoder, which also creates the export
    the first time.

    >>> encoder = OnnxQueryEncoder.for_manifest(collection.manifest, settings)  # None: no export cached yet
    >>> encoder.encode_queries(["what is faiss?"]).shape
    (1, 384)
    """

    device = "cpu"
    precision = "fp32"

    def __init__(self, profile: ModelProfile, manifest: Manifest, tokenizer, prompt: str | None, session, batch_size):
        self.profile = profile
        self._manifest = manifest
        self.head = HeadChoice(
            None if manifest.head.startswith("native") else manifest.head.split("[")[0],
            manifest.dim,
            truncate=manifest.head.endswith("]"),
        )
        self.prompt_type = manifest.prompt_type
        self.max_seq_length = manifest.max_length
        self.query_prompt = prompt
        self.stats = EncodeStats()
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._batch_size = batch_size
        self._forward_lock = threading.Lock()

    @classmethod
    def for_manifest(cls, manifest: Manifest, settings: Settings, model: str | None = None) -> OnnxQueryEncoder | None:
        """The query encoder of the collection ``manifest`` describes, or None where it cannot give the full
        encoder's vectors: no fp32 export cached for the model and head, no ``tokenizer.json`` (or one the model
        lowercases for, or without a padding token), another ``model`` asked for, or settings that ask for torch
        (``encoder.backend``) or CUDA (``processing.device``)."""
        if settings.encoder.backend == "torch" or settings.processing.device not in ("auto", "cpu"):
            return None
        profile = resolve_profile(model or manifest.model)
        if (profile.model_id, profile.revision) != (manifest.model_id, manifest.revision):
            return None  # the full encoder refuses it, saying why
        fingerprint = graph_fingerprint(profile, manifest.head, manifest.normalized, manifest.max_length)
        graph = graph_path(onnx_dir(settings), fingerprint)
        if not graph.exists():
            return None
        folder = model_folder(profile)
        tokenizer = _query_tokenizer(folder, manifest.max_length)
        if tokenizer is None:
            return None
        prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
        prompt = prompts.get(PROMPT_NAMES[manifest.prompt_type][0]) or None
        started = time.perf_counter()
        session = cpu_session(graph)
        log.info("loaded %s queries from %s in %.2fs", profile.name, graph, time.perf_counter() - started)
        return cls(profile, manifest, tokenizer, prompt, session, settings.encoder.batch_size)

    @property
    def dim(self) -> int:
        return self._manifest.dim

    def manifest(self) -> Manifest:
        return Manifest(
            model=self.profile.name,
            model_id=self.profile.model_id,
            revision=self.profile.revision,
            dim=self.dim,
            head=self._manifest.head,
            prompt_type=self.prompt_type,
            max_length=self.max_seq_length,
            normalized=self._manifest.normalized,
            precision=self.precision,
        )

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Vectors for search queries (with the query prompt of the prompt type), as :meth:`Encoder.encode_queries`
        computes them: longest texts first, in batches of ``encoder.batch_size``."""
        started = time.perf_counter()
        out = np.empty((len(texts), self.dim), dtype="float32")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        prefix = self.query_prompt or ""
        for start in range(0, len(texts), self._batch_size):
            idx = order[start : start + self._batch_size]
            encodings = self._tokenizer.encode_batch([prefix + texts[i] for i in idx])
            features = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            with self._forward_lock:
                raw = self._session.run(None, {name: features[name] for name in self._inputs})[0]
            out[idx] = self._finish(raw)
            self.stats.batches += 1
            self.stats.tokens += int(features["attention_mask"].sum())
            self.stats.padded_tokens += features["attention_mask"].size
        self.stats.texts += len(texts)
        self.stats.seconds += time.perf_counter() - started
        return out

    def _finish(self, embeddings: np.ndarray) -> np.ndarray:
        """The head's truncation and the normalisation, as :meth:`Encoder._finish` does them."""
        embeddings = embeddings[:, : self.dim].astype(np.float32)
        if self._manifest.normalized:
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.maximum(norms, 1e-12)
        return embeddings


def _read_json(path: Path):
    """A model folder's JSON file; {} where it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _query_tokenizer(folder: Path, max_length: int):
    """The model's fast tokenizer (``tokenizer.json`` of its Transformer module) set up as sentence-transformers
    calls it: truncated to ``max_length`` tokens and padded to the longest text of a batch, on the sides its
    ``tokenizer_config.json`` names; None where that cannot reproduce it."""
    from tokenizers import Tokenizer

    modules = _read_json(folder / "modules.json") or []
    transformer = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")), "")
    root = folder / transformer
    if not (root / "tokenizer.json").exists() or _read_json(root / "sentence_bert_config.json").get("do_lower_case"):
        return None
    config = _read_json(root / "tokenizer_config.json")
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    pad_id = tokenizer.token_to_id(pad) if pad else None
    if pad_id is None:
        return None
    tokenizer.enable_truncation(max_length, direction=config.get("truncation_side", "right"))
    tokenizer.enable_padding(direction=config.get("padding_side", "right"), pad_id=pad_id, pad_token=pad)
    return tokenizer


def graph_fingerprint(profile: ModelProfile, head: str, normalized: bool, max_length: int) -> str:
    """Identifies a model's full-precision computation (model, revision or folder contents, head label,
    normalisation, max length): keys its ONNX export.

    >>> len(graph_fingerprint(resolve_profile("minilm"), "native", True, 256))
    16
    """
    parts = [profile.model_id, profile.revision or _folder_stamp(profile.local_path), head, str(normalized)]
    return hashlib.sha256("\x1f".join([*parts, str(max_length)]).encode()).hexdigest()[:16]


def padding_capped_batches(lengths: np.ndarray, budget: int, min_tokens: int, max_padding: float) -> list[np.ndarray]:
    """Indices, longest first, cut into batches of at most ``budget`` padded tokens whose padding stays within
    ``max_padding`` once they hold ``min_tokens`` real tokens.

    Filling every batch to the budget pads each short text to the batch's first, longest one; with few passages
    per budget that was 24% of the computed tokens (2,000 msmarco passages at 128 x 512), against 3.8% when a
    batch that already holds ``min_tokens`` stops before a text would take its padding past 3%.

    >>> [b.tolist() for b in padding_capped_batches(np.array([100, 98, 60, 59, 58]), 1000, 150, 0.05)]
    [[0, 1], [2, 3, 4]]
    """
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    batches, start = [], 0
    while start < len(order):
        width = max(1, int(ordered[start]))
        rows, real = 1, int(ordered[start])
        while start + rows < len(order) and (rows + 1) * width <= budget:
            grown = real + int(ordered[start + rows])
            if real >= min_tokens and 1 - grown / ((rows + 1) * width) > max_padding:
                break
            real, rows = grown, rows + 1
        batches.append(order[start : start + rows])
        start += rows
    return batches


def _per_text(value, texts: int) -> bool:
    """Whether a tokenised feature holds a row per text (ids, masks), not a scalar (``prompt_length``)."""
    return getattr(value, "ndim", 0) in (1, 2) and value.shape[0] == texts


def _rows(value, idx, columns: slice, texts: int):
    """A batch's part of one tokenised feature: token tensors cut to its rows and width, per-text vectors to its
    rows, anything else (``prompt_length``) as it is. ``idx``: numpy on the host, a tensor on the feature's
    device."""
    if not _per_text(value, texts):
        return value
    if value.ndim == 1:
        return value[idx]
    # contiguous, as a host-to-device copy makes it: a compiled forward's stride guards saw contiguous inputs
    return value[idx][:, columns].contiguous()


def _folder_stamp(folder: str | None) -> str:
    """Names, sizes and mtimes of a model folder's files: a local model has no revision to pin."""
    if not folder:
        return ""
    entries = sorted(
        f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in Path(folder).rglob("*")
        if p.is_file()
    )
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _native_dim(st_model) -> int:
    getter = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    return int(getter())


def _xformers_on(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


def _use_head(st_model, folder: Path, head: HeadChoice, profile: ModelProfile) -> None:
    """Swap the model's Dense module for the chosen head's folder (heads are separate layers, not prefixes)."""
    if head.head_folder is None or head.head_folder == default_head(folder):
        return
    from sentence_transformers.sentence_transformer.modules import Dense

    for name, module in st_model.named_children():
        if isinstance(module, Dense):
            replacement = Dense.load(
                str(folder),
                subfolder=head.head_folder,
                local_files_only=True,
                trust_remote_code=profile.trust_remote_code,
            )
            st_model._modules[name] = replacement.to(st_model.device)
            return
    raise InvalidInputError(f"model {profile.model_id} has MRL head folders but no Dense module in modules.json")
