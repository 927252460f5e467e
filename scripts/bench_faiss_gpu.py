"""FAISS on the GPU (item 6 of the performance issue): GPU Flat, IVF and CAGRA on real embeddings, filtered search
that stays exact, and whether GPU indexes honour an ``IDSelector``; written as JSON, every figure against exact
search in the same run.

The vectors are bench_scale.py's real passage set (the same windows, options and cache; ``--encode-device cuda``
encodes on the GPU) and the queries are the 383 real queries of the carried sets. Sections:

- **flat**: the project's ``VectorIndex`` (a GPU copy of ``IDMap2,Flat`` where faiss sees a GPU): top-10 agreement
  with CPU exact search, batch-1 p50/p99, and queries/s for all queries in one batch.
- **ivf**: ``IVF{nlist},Flat`` and ``IVF{nlist},SQ8`` trained on the CPU, cloned to the GPU with
  ``index_cpu_to_gpu``, swept over ``nprobe`` (passed per search in ``SearchParametersIVF``): recall@10 and speed.
- **cagra**: ``GpuIndexCagra`` (cuVS builds only), swept over ``itopk_size``.
- **filtered**: the project's filtered search on the GPU copy (selectors are not trusted there:
  ``storage.vector_index.filtered_search`` searches exactly over the allowed ids when they are few and
  over-fetches otherwise) against the CPU index with an ``IDSelectorBatch``, at several selectivities: the share
  of queries whose top-10 ids are identical must be 1.
- **selector_probe**: a raw GPU Flat index searched with ``IDSelectorRange`` over half the ids, with the cloner's
  ``use_cuvs`` on and off: does any id outside the range come back? (The GPU page saw one ignored; faiss's source
  applies selectors only in its cuVS paths.)

Every step runs in its own try block: a failure is recorded with its exception and the run goes on. Without a GPU
the GPU steps are recorded as skipped and the rest runs on CPU indexes (a smoke run).

    python scripts/bench_faiss_gpu.py --docstrings --longest 5 --encode-minutes 8 \
        --out scripts/results/bench_faiss_gpu.json                       # GPU machine (encodes on CUDA there)
    python scripts/bench_faiss_gpu.py --limit 4000 --out /tmp/faiss-smoke.json   # smoke, CPU

The JSON is rewritten after every step, so a run cut off by the device's 10-minute limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import (  # noqa: E402
    DATA,
    ROOT,
    encode_cached,
    latencies_ms,
    load_encoder,
    passage_set,
    real_queries,
    timing,
)

sys.path.insert(0, str(ROOT))

K = 10


def batch1_ms(search, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-query p50/p99 of ``search(q, K)`` one query at a time (bench_scale's loop), and the ids found."""
    ms, found = latencies_ms(search, queries)
    measured = timing(ms)
    return {"p50_ms": measured["p50_ms"], "p99_ms": measured["p99_ms"]}, found


def batched_qps(search, queries: np.ndarray, repeat: int = 5) -> float:
    search(queries, K)
    started = time.perf_counter()
    for _ in range(repeat):
        search(queries, K)
    return round(repeat * len(queries) / (time.perf_counter() - started), 1)


def step(result: dict, name: str, fn, out: Path) -> None:
    """Run one step; its outcome, or the exception that stopped it, goes into ``result[name]``, written to ``out``."""
    started = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as exc:  # a failing step is a finding: record it and go on
        result[name] = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
    print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encode-minutes", type=float, default=20.0)
    parser.add_argument("--encode-device", default=None, help="cpu (ONNX) or cuda (torch, bf16); default: cuda if any")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--docstrings", action="store_true", help="bench_scale's --docstrings")
    parser.add_argument("--longest", type=int, default=3, help="bench_scale's --longest")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--itopk", default="32,64,128,256")
    parser.add_argument("--selectivities", default="0.0005,0.01,0.1,0.5")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench_faiss_gpu.json")
    args = parser.parse_args()

    import faiss
    import torch

    from storage.vector_index import VectorIndex, auto_nlist, gpu_count, recall_at_k

    if args.encode_device is None:
        args.encode_device = "cuda" if torch.cuda.is_available() else "cpu"
    texts, _, sources = passage_set(args.docstrings, args.longest)
    if args.limit:
        texts = texts[: args.limit]
    vectors, encode_seconds = encode_cached(texts, args.encode_minutes, args.batch_size, args.encode_device)
    n, dim = vectors.shape
    ids = np.arange(1, n + 1, dtype="int64")
    encoder = load_encoder(args.batch_size, args.encode_device)
    queries = encoder.encode_queries(real_queries(DATA)[0])
    del encoder
    gpus = gpu_count()
    print(f"{n} vectors of {dim} dims, {len(queries)} queries, {gpus} GPU(s)", file=sys.stderr)

    exact = VectorIndex.empty(dim, use_gpu=False)
    exact.add(vectors, ids)
    truth = exact.search(queries, K)[1]
    result: dict = {
        "benchmark": "faiss_gpu",
        "command": "python scripts/bench_faiss_gpu.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus, "faiss": faiss.__version__},
        "vectors": {
            "n": n,
            "dim": dim,
            "windows_by_source": sources,
            "encode_minutes": round(encode_seconds / 60, 1),
            "encoder": f"minilm on {args.encode_device}",
            "queries": len(queries),
        },
    }
    resources = faiss.StandardGpuResources() if gpus else None

    def flat() -> dict:
        index = VectorIndex.empty(dim, use_gpu=bool(gpus))
        started = time.perf_counter()
        index.add(vectors, ids)
        index.search(queries[:1], K)  # makes the GPU copy
        build_s = time.perf_counter() - started
        timing, found = batch1_ms(index.search, queries)
        return {
            "on_gpu": index.on_gpu,
            "build_and_copy_s": round(build_s, 2),
            "identical_top10_share": float(np.mean([(f == t).all() for f, t in zip(found, truth)])),
            "recall_at_10": recall_at_k(found, truth),
            "batch1": timing,
            "batched_qps": batched_qps(index.search, queries),
            "cpu_exact_batch1": batch1_ms(exact.search, queries)[0],
            "cpu_exact_batched_qps": batched_qps(exact.search, queries),
        }

    def ivf(codes: str):
        def run() -> dict:
            nlist = auto_nlist(n)
            cpu = faiss.index_factory(dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
            started = time.perf_counter()
            sample = vectors[np.random.default_rng(0).permutation(n)[: min(n, 256 * nlist)]]
            cpu.train(sample)
            cpu.add_with_ids(vectors, ids)
            train_add_s = time.perf_counter() - started
            started = time.perf_counter()
            clone_note = "default cloner options" if gpus else "no GPU: the CPU index"
            index = cpu
            if gpus:
                try:
                    index = faiss.index_cpu_to_gpu(resources, 0, cpu)
                except Exception as exc:  # e.g. a codec the cuVS path lacks: the classic GPU IVF may still take it
                    options = faiss.GpuClonerOptions()
                    options.use_cuvs = False
                    index = faiss.index_cpu_to_gpu(resources, 0, cpu, options)
                    clone_note = f"default cloner failed ({type(exc).__name__}: {exc}); cloned with use_cuvs=False"
            copy_s = time.perf_counter() - started
            sweep = []
            for nprobe in [int(p) for p in args.nprobes.split(",") if int(p) <= nlist]:
                params = faiss.SearchParametersIVF(nprobe=nprobe)

                def search(q, k, params=params):
                    return index.search(q, k, params=params)

                timing, found = batch1_ms(search, queries)
                sweep.append(
                    {
                        "nprobe": nprobe,
                        "recall_at_10": recall_at_k(found, truth),
                        **timing,
                        "qps": batched_qps(search, queries),
                    }
                )
            return {
                "index_type": f"IVF{nlist},{codes}",
                "on_gpu": bool(gpus),
                "cpu_train_add_s": round(train_add_s, 1),
                "copy_to_gpu_s": round(copy_s, 2),
                "clone": clone_note,
                "sweep": sweep,
            }

        return run

    def cagra() -> dict:
        if not gpus:
            return {"skipped": "no GPU"}
        if not hasattr(faiss, "GpuIndexCagra"):
            return {"skipped": "this faiss build has no GpuIndexCagra (needs the cuVS build)"}
        config = faiss.GpuIndexCagraConfig()
        config.graph_degree, config.intermediate_graph_degree = 64, 128
        index = faiss.GpuIndexCagra(resources, dim, faiss.METRIC_INNER_PRODUCT, config)
        started = time.perf_counter()
        index.train(vectors)  # CAGRA builds its graph from the training vectors; positions are the ids
        build_s = time.perf_counter() - started
        sweep = []
        for itopk in [int(t) for t in args.itopk.split(",")]:
            params = faiss.SearchParametersCagra()
            params.itopk_size = itopk

            def search(q, k, params=params):
                scores, positions = index.search(q, k, params=params)
                return scores, np.where(positions >= 0, positions + 1, -1)  # positions -> ids (1-based here)

            timing, found = batch1_ms(search, queries)
            sweep.append(
                {
                    "itopk_size": itopk,
                    "recall_at_10": recall_at_k(found, truth),
                    **timing,
                    "qps": batched_qps(search, queries),
                }
            )
        return {"graph_degree": 64, "build_s": round(build_s, 1), "sweep": sweep}

    def filtered() -> dict:
        index = VectorIndex.empty(dim, use_gpu=bool(gpus))
        index.add(vectors, ids)
        rng = np.random.default_rng(1)
        rows = []
        for share in [float(s) for s in args.selectivities.split(",")]:
            allowed = np.sort(rng.choice(ids, size=max(K, math.ceil(share * n)), replace=False))
            want_scores, want = exact.search(queries, K, allowed=allowed)
            timing, found = batch1_ms(lambda q, k, a=allowed: index.search(q, k, allowed=a), queries)
            got_scores = index.search(queries, K, allowed=allowed)[0]
            rows.append(
                {
                    "selectivity": share,
                    "allowed": len(allowed),
                    "identical_top10_share": float(np.mean([(f == t).all() for f, t in zip(found, want)])),
                    "max_score_difference": float(np.abs(got_scores - want_scores).max()),
                    "all_results_allowed": bool(np.isin(found, allowed).all()),
                    **timing,
                }
            )
        return {"on_gpu": index.on_gpu, "rows": rows}

    def selector_probe() -> dict:
        if not gpus:
            return {"skipped": "no GPU"}
        cpu = faiss.IndexFlatIP(dim)
        cpu.add(vectors)
        half = n // 2
        out = {}
        for use_cuvs in (False, True):
            options = faiss.GpuClonerOptions()
            if not hasattr(options, "use_cuvs"):
                out["use_cuvs"] = "the cloner options have no use_cuvs"
                break
            options.use_cuvs = use_cuvs
            try:
                gpu = faiss.index_cpu_to_gpu(resources, 0, cpu, options)
                found = gpu.search(queries, K, params=faiss.SearchParameters(sel=faiss.IDSelectorRange(0, half)))[1]
                outside = int(((found >= half) | (found < 0)).sum())
                out[f"use_cuvs_{use_cuvs}"] = {"ids_outside_range": outside, "selector_honoured": outside == 0}
            except Exception as exc:
                out[f"use_cuvs_{use_cuvs}"] = {"failed": f"{type(exc).__name__}: {exc}"}
        return out

    for name, fn in [
        ("flat", flat),
        ("ivf_flat", ivf("Flat")),
        ("ivf_sq8", ivf("SQ8")),
        ("cagra", cagra),
        ("filtered", filtered),
        ("selector_probe", selector_probe),
    ]:
        step(result, name, fn, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
