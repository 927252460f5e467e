"""Prometheus metrics of one application instance (its own registry, so several apps can live in one process).

Request latency per route, encode time per batch, texts encoded (rate() gives texts/s, and the last batch's
rate is a gauge), passages per collection, searches an approximate index answered short (then answered exactly),
and GPU memory where CUDA is present.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "stella_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.encode_seconds = Histogram(
            "stella_encode_batch_seconds",
            "time to encode one batch of texts",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.encoded_texts = Counter("stella_encoded_texts", "texts encoded", registry=self.registry)
        self.query_batch_size = Histogram(
            "stella_query_batch_requests",
            "search requests encoded together in one micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.texts_per_second = Gauge(
            "stella_encode_texts_per_second", "throughput of the last encoded batch", registry=self.registry
        )
        self._service = None
        self.registry.register(_CollectionCollector(self))

    def bind(self, service) -> None:
        self._service = service

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)

    def observe_encode(self, seconds: float, texts: int) -> None:
        if texts == 0:
            return
        self.encode_seconds.observe(seconds)
        self.encoded_texts.inc(texts)
        if seconds > 0:
            self.texts_per_second.set(texts / seconds)

    def observe_batch_size(self, requests: int) -> None:
        self.query_batch_size.observe(requests)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CollectionCollector:
    """Read at scrape time: passages and index vectors per collection, GPU memory."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        service = self.metrics._service
        passages = GaugeMetricFamily("stella_collection_passages", "passages stored", labels=["collection"])
        vectors = GaugeMetricFamily("stella_index_vectors", "vectors in the FAISS index", labels=["collection"])
        shard_passages = GaugeMetricFamily(
            "stella_shard_passages", "passages stored per shard of a sharded collection", labels=["collection", "shard"]
        )
        shard_vectors = GaugeMetricFamily(
            "stella_shard_index_vectors", "vectors in each shard's FAISS index", labels=["collection", "shard"]
        )
        shard_up = GaugeMetricFamily(
            "stella_shard_up", "1 when the shard answered the scrape, 0 when not", labels=["collection", "shard"]
        )
        exact_fallbacks = CounterMetricFamily(
            "stella_exact_fallback_searches",
            "approximate-index searches that found fewer than k hits and were answered exactly from stored vectors",
            labels=["collection"],
        )
        if service is not None:
            for name, health in service.health().collections.items():
                passages.add_metric([name], health["passages"])
                vectors.add_metric([name], health["index_vectors"])
                shards_up = [s for s in health.get("shards", []) if s["status"] == "ok"]
                fallbacks = health.get("exact_fallback_searches", sum(s["exact_fallback_searches"] for s in shards_up))
                exact_fallbacks.add_metric([name], fallbacks)
                for shard in health.get("shards", []):
                    shard_up.add_metric([name, shard["shard"]], int(shard["status"] == "ok"))
                    if shard["status"] == "ok":
                        shard_passages.add_metric([name, shard["shard"]], shard["passages"])
                        shard_vectors.add_metric([name, shard["shard"]], shard["index_vectors"])
        yield from (passages, vectors, shard_passages, shard_vectors, shard_up, exact_fallbacks)
        import torch

        if torch.cuda.is_available():
            gpu = GaugeMetricFamily("stella_gpu_memory_bytes", "CUDA memory", labels=["kind"])
            gpu.add_metric(["allocated"], torch.cuda.memory_allocated())
            gpu.add_metric(["reserved"], torch.cuda.memory_reserved())
            yield gpu
