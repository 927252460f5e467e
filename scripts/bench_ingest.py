"""Ingest throughput of every encoder backend against the seed baseline, measured in the same run, written as JSON.

Per corpus: the baseline is plain ``SentenceTransformer.encode(texts, batch_size=16, normalize_embeddings=True)``
of exactly the passage texts the pipeline produces, plus ``faiss.IndexFlatIP.add``. Then, per backend, the
project's bare encoder on the same texts (``Encoder.encode_passages``) and a full ``stella-search`` ingest of the
corpus into a fresh collection (read, validate, chunk, encode, SQLite commit with vectors, FAISS, checkpoint);
their ratio is the pipeline's overhead. Ratios are against the baseline of the same corpus in the same run.

    python scripts/bench_ingest.py tests/data/msmarco/corpus.jsonl tests/data/scifact/corpus.jsonl
    python scripts/bench_ingest.py tests/data/msmarco/corpus.jsonl tests/data/scifact/corpus.jsonl \
        --limit 1500 --backends onnx-int8 --rounds 3 --out scripts/results/bench_ingest_default.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from results_json import write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_corpus(corpus: Path, limit: int | None, model: str, backends: list[str], rounds: int = 1) -> dict:
    """The baseline and each backend on one corpus: seconds, passages/s, ratios, overhead, vector agreement.

    With ``rounds`` > 1 every measurement is repeated, round after round in the same order (baseline, then per
    backend the bare encoder and the full ingest), and the fastest of each is reported: on a shared machine one
    slow moment then skews no ratio, and the overhead (a ratio of two timings) is not at the mercy of one of them.
    """
    import faiss
    from sentence_transformers import SentenceTransformer

    from indexer.chunking import Chunker, text_to_encode
    from indexer.encoder import Encoder
    from indexer.models import model_folder, resolve_profile
    from indexer.pipeline import ingest_documents
    from indexer.settings import load_settings
    from indexer.sources import read_documents
    from storage.collection import Collection

    # only its tokenizer chunks the corpus here: torch loads no ONNX session
    settings = load_settings(
        cli={"encoder": {"model": model, "backend": "torch"}, "processing": {"device": "cpu"}}, environ={}
    )
    documents = list(read_documents(corpus))[:limit]
    encoder = Encoder.load(model, settings)
    chunker = Chunker(
        encoder.chunk_tokenizer, encoder.max_seq_length, settings.ingest.chunk_overlap, encoder.passage_prompt
    )
    texts = [text_to_encode(title, p.text) for title, ps in chunker.split_for_encoding(documents) for p in ps]
    n = len(texts)
    del encoder

    baseline_model = SentenceTransformer(str(model_folder(resolve_profile(model))), device="cpu")
    baseline_model.max_seq_length = chunker.max_seq_length
    baseline_model.encode(texts[:32], batch_size=16)  # warm-up
    loaded = {}
    for backend in backends:
        backend_settings = load_settings(
            cli={"encoder": {"model": model, "backend": backend}, "processing": {"device": "cpu"}}, environ={}
        )
        loaded[backend] = (Encoder.load(model, backend_settings), backend_settings)
        loaded[backend][0].encode_passages(texts[:32])  # warm-up (and the one-time ONNX export and quantisation)

    timings: dict[str, list[float]] = {"baseline": []}
    reference = None
    vectors = {}
    for _ in range(rounds):
        started = time.perf_counter()
        reference = baseline_model.encode(texts, batch_size=16, normalize_embeddings=True)
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference)
        timings["baseline"].append(time.perf_counter() - started)
        for backend, (encoder, backend_settings) in loaded.items():
            started = time.perf_counter()
            encoded = encoder.encode_passages(texts)
            timings.setdefault(f"{backend}/encoder", []).append(time.perf_counter() - started)
            vectors[backend] = encoded
            with tempfile.TemporaryDirectory() as tmp:
                collection = Collection.create(Path(tmp) / "bench", encoder.manifest())
                started = time.perf_counter()
                report = ingest_documents(collection, encoder, documents, backend_settings, quiet=True)
                timings.setdefault(f"{backend}/ingest", []).append(time.perf_counter() - started)
                collection.close()
            assert report.passages_written == n, (report.passages_written, n)

    def summary(key: str) -> dict:
        best = min(timings[key])
        out = {"seconds": round(best, 2), "passages_per_s": round(n / best, 1)}
        if rounds > 1:
            out["seconds_by_round"] = [round(t, 2) for t in timings[key]]
        return out

    baseline_s = min(timings["baseline"])
    measured = {}
    for backend, (encoder, _) in loaded.items():
        bare_encode_s, ingest_s = min(timings[f"{backend}/encoder"]), min(timings[f"{backend}/ingest"])
        cosine = (vectors[backend] * reference).sum(axis=1)
        measured[backend] = {
            "encoder_only": summary(f"{backend}/encoder"),
            "ingest": summary(f"{backend}/ingest"),
            "ratio_encoder_only_vs_baseline": round(baseline_s / bare_encode_s, 3),
            "ratio_ingest_vs_baseline": round(baseline_s / ingest_s, 3),
            "pipeline_overhead_vs_encoder_only": round(ingest_s / bare_encode_s - 1, 4),
            "precision": encoder.precision,
            "int8_recipe": repr(encoder.int8) if encoder.int8 else None,
            "cosine_to_baseline_vectors": {
                "mean": round(float(cosine.mean()), 6),
                "min": round(float(cosine.min()), 6),
            },
        }
    return {
        "corpus": str(corpus),
        "documents": len(documents),
        "passages": n,
        "rounds": rounds,
        "baseline": summary("baseline"),
        "backends": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", type=Path, nargs="+", help="BEIR corpus.jsonl files")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each corpus only")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8", help="encoder backends, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement; report the fastest of each")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_ingest.json"))
    args = parser.parse_args()

    import onnxruntime
    import torch

    started, load_before = time.time(), os.getloadavg()  # other work on the machine skews every figure alike
    corpora = [
        bench_corpus(corpus, args.limit, args.model, args.backends.split(","), args.rounds) for corpus in args.corpora
    ]
    result = {
        "benchmark": "ingest",
        "command": "python scripts/bench_ingest.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_average_before_after": [load_before, os.getloadavg()],
        },
        "minutes": round((time.time() - started) / 60, 1),
        "baseline_what": "SentenceTransformer.encode(batch_size=16, normalize_embeddings=True) + IndexFlatIP.add",
        "ingest_what": "read + chunk + encode + SQLite commit (vectors and FTS in rows) + FAISS + checkpoint",
        "corpora": corpora,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
