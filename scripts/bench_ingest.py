"""Ingest throughput against the seed baseline, measured in the same run, written as JSON.

Baseline: plain ``SentenceTransformer.encode(texts, batch_size=16, normalize_embeddings=True)`` of exactly the
passage texts the pipeline produces, plus ``faiss.IndexFlatIP.add``. Measured: ``stella-search`` ingest of the
same corpus into a fresh collection (read, validate, chunk, encode, SQLite commit with vectors, FAISS, checkpoint),
and the project's bare encoder on the same texts (to separate pipeline overhead from encoding).

    python scripts/bench_ingest.py ../shared/data/msmarco/corpus.jsonl --out scripts/results/bench_ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", default="torch,onnx", help="encoder backends to measure, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_ingest.json"))
    args = parser.parse_args()

    import faiss
    import torch
    from sentence_transformers import SentenceTransformer

    from indexer.chunking import Chunker, text_to_encode
    from indexer.encoder import Encoder
    from indexer.models import model_folder, resolve_profile
    from indexer.pipeline import ingest_documents
    from indexer.settings import load_settings
    from indexer.sources import read_documents
    from storage.collection import Collection

    settings = load_settings(cli={"encoder": {"model": args.model}, "processing": {"device": "cpu"}})
    documents = list(read_documents(args.corpus))[: args.limit]
    encoder = Encoder.load(args.model, settings)
    chunker = Chunker(encoder.tokenizer, encoder.max_seq_length, settings.ingest.chunk_overlap, encoder.passage_prompt)
    texts = [text_to_encode(d.title, p.text) for d in documents for p in chunker.split(d)]

    baseline_model = SentenceTransformer(str(model_folder(resolve_profile(args.model))), device="cpu")
    baseline_model.max_seq_length = encoder.max_seq_length
    baseline_model.encode(texts[:32], batch_size=16)  # warm-up
    started = time.perf_counter()
    vectors = baseline_model.encode(texts, batch_size=16, normalize_embeddings=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    baseline_s = time.perf_counter() - started

    n = len(texts)
    measured = {}
    for backend in args.backends.split(","):
        backend_settings = load_settings(
            cli={"encoder": {"model": args.model, "backend": backend}, "processing": {"device": "cpu"}}
        )
        encoder = Encoder.load(args.model, backend_settings)
        encoder.encode_passages(texts[:32])  # warm-up (and the one-time ONNX export)
        started = time.perf_counter()
        encoded = encoder.encode_passages(texts)
        bare_encode_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            collection = Collection.create(Path(tmp) / "bench", encoder.manifest())
            started = time.perf_counter()
            report = ingest_documents(collection, encoder, documents, backend_settings, quiet=True)
            ingest_s = time.perf_counter() - started
            collection.close()
        assert report.passages_written == n, (report.passages_written, n)
        measured[backend] = {
            "encoder_only": {"seconds": round(bare_encode_s, 2), "passages_per_s": round(n / bare_encode_s, 1)},
            "ingest": {"seconds": round(ingest_s, 2), "passages_per_s": round(n / ingest_s, 1)},
            "ratio_ingest_vs_baseline": round(baseline_s / ingest_s, 3),
            "pipeline_overhead_vs_encoder_only": round(ingest_s / bare_encode_s - 1, 4),
            "max_abs_diff_vs_baseline_vectors": float(np.abs(encoded - vectors).max()),
        }

    result = {
        "benchmark": "ingest",
        "corpus": str(args.corpus),
        "model": args.model,
        "documents": len(documents),
        "passages": n,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "baseline": {
            "what": "SentenceTransformer.encode(batch_size=16, normalize_embeddings=True) + IndexFlatIP.add",
            "seconds": round(baseline_s, 2),
            "passages_per_s": round(n / baseline_s, 1),
        },
        "ingest_what": "read + chunk + encode + SQLite commit (vectors and FTS in rows) + FAISS + checkpoint",
        "backends": measured,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
