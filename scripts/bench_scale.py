"""Index types at scale on real embeddings: Flat against IVF, HNSW and the auto-chosen index, in one run.

The passage set is real text only: every BEIR corpus under ``tests/data`` split into overlapping windows of
1-3 consecutive sentences (every start sentence, every length), plus the Python reference documentation that ships
with the interpreter (``pydoc_data.topics``), windowed the same way. Windows are shuffled with a fixed seed and
encoded by the embedded MiniLM (ONNX Runtime, the fastest CPU path) in chunks cached under ``.stella-cache/``,
for at most ``--encode-minutes``: N is whatever that budget encodes. Reruns reuse the cache.

Per index type (one FAISS thread, one query at a time, k=10): build time, bytes per vector (serialised index /
N), search p50/p99, recall@10 against exact search for the 383 real queries of the three carried sets and for
held-out passages (labelled: passages-as-queries flatter an index), and speed against Flat measured in this run.
A labelled synthetic section then draws 1M vectors from a Gaussian with the real set's mean and covariance
(normalised) for memory and latency only: no recall figure comes from it.

    python scripts/bench_scale.py --encode-minutes 20          # encode (cached), then benchmark
    python scripts/bench_scale.py --encode-only --encode-minutes 20
    python scripts/bench_scale.py --synthetic 0                # skip the 1M section

On the GPU machine (item 5 there): ``--encode-device cuda`` encodes with the torch encoder in bf16 instead, and
``--docstrings --longest 5`` grows the real set with the prose paragraphs of the installed packages' docstrings
(doctests, code and parameter lists left out) and windows of up to five sentences: here that is 240k corpus and
python-docs windows plus about 190k docstring windows (at three sentences); 1M real windows needs a larger
package set than either machine is known to have, so N is reported as found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "tests" / "data"
CACHE = ROOT / ".stella-cache" / "bench_scale"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
CHUNK = 8192  # windows encoded and cached per file: an interrupted encode loses at most one chunk
SEED = 20261123
SYNTHETIC_TRAINING = 65_536


def sentences(text: str) -> list[str]:
    """Sentences of ``text`` by end punctuation followed by a capital, digit or quote (good enough for windows)."""
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if len(s.strip()) > 1]


def windows(text: str, title: str | None = None, longest: int = 3) -> list[str]:
    """Every run of 1..``longest`` consecutive sentences of ``text``; the title, when any, is prepended."""
    parts = sentences(text)
    prefix = f"{title} " if title else ""
    return [
        prefix + " ".join(parts[i : i + n])
        for i in range(len(parts))
        for n in range(1, longest + 1)
        if i + n <= len(parts)
    ]


def corpus_windows(data_root: Path, longest: int = 3) -> dict[str, list[tuple[str, str]]]:
    """(window, source document) of every ``corpus.jsonl`` under ``data_root``, by data set name."""
    out = {}
    for corpus in sorted(data_root.glob("*/corpus.jsonl")):
        pairs = []
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                key = f"{corpus.parent.name}/{record['_id']}"
                text, title = record.get("text") or "", record.get("title") or None
                pairs += [(w, key) for w in windows(text, title, longest)]
        out[corpus.parent.name] = pairs
    return out


def python_docs_windows(longest: int = 3) -> list[tuple[str, str]]:
    """(window, topic) of the Python language reference shipped with the interpreter (real English prose)."""
    import pydoc_data.topics

    pairs = []
    for topic, body in pydoc_data.topics.topics.items():
        # paragraphs, skipping code blocks and tables (lines that start indented)
        for paragraph in re.split(r"\n\s*\n", body):
            lines = paragraph.splitlines()
            if lines and not any(line.startswith("   ") for line in lines) and len(paragraph) > 40:
                pairs += [(w, f"python-docs/{topic}") for w in windows(paragraph, longest=longest)]
    return pairs


PROSE_WORD = re.compile(r"^[(\"']?[A-Za-z][a-z'-]*[)\"']?[.,;:!?]?[)\"']?$")


def is_prose(paragraph: str) -> bool:
    """A paragraph of English sentences: no indented lines (code, parameter lists), no doctest or markup, at least
    eight whitespace-separated tokens of which 80% are plain words."""
    lines = paragraph.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines[1:]) or ">>>" in paragraph or "::" in paragraph:
        return False
    tokens = paragraph.split()
    return len(tokens) >= 8 and sum(bool(PROSE_WORD.match(t)) for t in tokens) >= 0.8 * len(tokens)


def docstring_windows(longest: int = 3) -> list[tuple[str, str]]:
    """(window, module) of the prose paragraphs of the docstrings of every installed package (site-packages):
    real English documentation that the package registry delivers, windowed like the corpora. Reaching a
    million real windows on the GPU machine needs more text than the carried corpora hold (178k windows)."""
    import ast
    import site

    pairs, seen = [], set()
    for root in site.getsitepackages():
        for path in sorted(Path(root).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            module = str(path.relative_to(root))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc or doc in seen:
                    continue
                seen.add(doc)
                for paragraph in re.split(r"\n\s*\n", doc):
                    if is_prose(paragraph):
                        pairs += [(w, f"docstrings/{module}") for w in windows(paragraph, longest=longest)]
    return pairs


def passage_set(docstrings: bool = False, longest: int = 3) -> tuple[list[str], list[str], dict[str, int]]:
    """(windows, their source documents, windows per source): deduplicated, shuffled with a fixed seed (so any
    prefix samples every source). ``docstrings`` adds the installed packages' documentation; windows are runs of
    1..``longest`` sentences."""
    sources = corpus_windows(DATA, longest)
    sources["python-docs"] = python_docs_windows(longest)
    if docstrings:
        sources["docstrings"] = docstring_windows(longest)
    seen: dict[str, str] = {}
    for pairs in sources.values():
        for text, key in pairs:
            seen.setdefault(text, key)
    texts = list(seen)
    order = np.random.default_rng(SEED).permutation(len(texts))
    return [texts[i] for i in order], [seen[texts[i]] for i in order], {n: len(p) for n, p in sources.items()}


def real_queries(data_root: Path) -> tuple[list[str], list[str]]:
    """(texts, data set names) of every query of every carried data set."""
    texts, names = [], []
    for queries in sorted(data_root.glob("*/queries.jsonl")):
        with open(queries, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)["text"])
                    names.append(queries.parent.name)
    return texts, names


def load_encoder(batch_size: int, device: str = "cpu"):
    """MiniLM through fp32 ONNX Runtime on the CPU (the fastest CPU path), or the torch encoder on ``device``
    (CUDA: bf16, token-budget batches of ``batch_size`` x 512 tokens)."""
    from indexer.encoder import Encoder
    from indexer.settings import load_settings

    backend = "onnx" if device == "cpu" else "torch"
    settings = load_settings(
        cli={
            "encoder": {
                "model": "minilm",
                "backend": backend,
                "batch_size": batch_size,
                "onnx_dir": str(ROOT / ".stella-cache" / "onnx"),
            },
            "processing": {"device": device},
        },
        environ={},
    )
    return Encoder.load("minilm", settings)


def encode_cached(texts: list[str], minutes: float, batch_size: int, device: str = "cpu") -> tuple[np.ndarray, float]:
    """(vectors, encode seconds) of the prefix of ``texts`` that ``minutes`` of encoding reaches.

    Chunks are cached with the seconds each took, so reruns reuse them and the budget counts every run's work.
    """
    encoder = load_encoder(batch_size, device)
    # the fingerprint names the model, head and precision (bf16 on the GPU) but not the device: GPU vectors get
    # their own cache here too (the CPU key is unchanged, so the CPU figure's cache still matches)
    where = "" if device == "cpu" else f"\x1e{device}:{next(encoder.model.parameters()).dtype}"
    key = hashlib.sha256(("\x1e".join(texts) + encoder.fingerprint + where).encode()).hexdigest()[:16]
    folder = CACHE / key
    folder.mkdir(parents=True, exist_ok=True)
    timings_path = folder / "seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    parts = []
    for number, start in enumerate(range(0, len(texts), CHUNK)):
        path = folder / f"{number:05d}.npy"
        if path.exists() and str(number) in timings:
            parts.append(np.load(path))
            continue
        if sum(timings.values()) >= minutes * 60:
            break
        started = time.perf_counter()
        vectors = encoder.encode_passages(texts[start : start + CHUNK])
        seconds = time.perf_counter() - started
        tmp = path.with_name(f".{path.stem}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
        timings[str(number)] = seconds
        timings_path.write_text(json.dumps(timings))
        parts.append(vectors)
        print(
            f"encoded {start + len(vectors)}/{len(texts)} windows ({len(vectors) / seconds:.0f}/s, "
            f"{sum(timings.values()) / 60:.1f} min in all)",
            file=sys.stderr,
            flush=True,
        )
    vectors = np.concatenate(parts) if parts else np.empty((0, encoder.dim), dtype="float32")
    return vectors, sum(timings[str(i)] for i in range(len(parts)))


def latencies_ms(search, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-query ms, top-10 ids) of ``search(queries, k)`` called one query at a time."""
    search(queries[:1], 10)  # warm-up
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, ids = search(q[None, :], 10)
        times.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return np.array(times), np.array(found)


def timing(ms: np.ndarray) -> dict:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "qps": round(1000 / float(ms.mean()), 1),
    }


def real_section(
    vectors: np.ndarray, texts: list[str], keys: list[str], held_out: int, types: list[str], recall: float
) -> dict:
    """Each index type built by ``Collection.optimize`` over a real collection, measured against Flat.

    The collection holds one document per source document (its windows are the passages), so the default
    tuning holds whole documents out as a real ingest would. The last ``held_out`` windows stay out of it and
    serve as held-out passage queries. Types are tuned the default way; ``auto`` and ``HNSW32`` once more on the
    even-numbered real queries (``--queries``), with recall also reported on the odd-numbered ones they never saw.
    """
    import tempfile

    import faiss

    from storage.collection import Collection, Document, Passage
    from storage.vector_index import recall_at_k

    encoder = load_encoder(64)
    query_texts, query_sets = real_queries(DATA)
    real = encoder.encode_queries(query_texts)
    for text in query_texts[:5]:  # warm-up
        encoder.encode_queries([text])
    started = time.perf_counter()
    for text in query_texts[:100]:  # what one search's query costs, for the Flat threshold
        encoder.encode_queries([text])
    encode_ms = (time.perf_counter() - started) * 1000 / 100
    manifest = encoder.manifest()
    del encoder
    groups: dict[str, list[int]] = {}
    for i in range(len(vectors) - held_out):
        groups.setdefault(keys[i], []).append(i)
    order = [i for members in groups.values() for i in members]  # passage ids follow this insertion order
    stored, held = vectors[order], vectors[-held_out:]
    n = len(stored)
    truth_index = faiss.IndexFlatIP(stored.shape[1])
    truth_index.add(stored)
    ids = np.arange(1, n + 1)  # passage ids are AUTOINCREMENT from 1, in insertion order
    truth = {"real": ids[truth_index.search(real, 10)[1]], "held_out": ids[truth_index.search(held, 10)[1]]}
    queries = {"real": real, "held_out": held}
    out: dict = {
        "n": n,
        "documents": len(groups),
        "held_out_queries": held_out,
        "real_queries": {name: query_sets.count(name) for name in sorted(set(query_sets))},
        "query_encode_ms_batch1": round(encode_ms, 2),
        "flat_p50_ms_by_n": {},
        "indexes": [],
        "sweeps": {},
    }
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        collection = Collection.create(Path(tmp) / "bench", manifest)
        keys_in_order, written = list(groups), 0
        for start in range(0, len(keys_in_order), 2000):
            docs, parts = [], []
            for key in keys_in_order[start : start + 2000]:
                windows_of = [texts[i] for i in groups[key]]
                text, offset = "\n".join(windows_of), 0
                docs.append(Document(key, None, text))
                for ordinal, window in enumerate(windows_of):
                    parts.append(Passage(key, ordinal, window, offset, offset + len(window)))
                    offset += len(window) + 1
            collection.write(docs, parts, stored[written : written + len(parts)])
            written += len(parts)
        for prefix in (10_000, 25_000, 50_000, 100_000):
            if prefix < n:
                flat = faiss.IndexFlatIP(stored.shape[1])
                flat.add(stored[:prefix])
                ms, _ = latencies_ms(flat.search, real)
                out["flat_p50_ms_by_n"][prefix] = timing(ms)["p50_ms"]
        flat_p50 = None
        tuning_queries = real[0::2]  # the odd-numbered ones stay unseen
        runs = [(t, None) for t in types] + [(t, tuning_queries) for t in ("auto", "HNSW32") if t in types]
        for requested, given in runs:
            report = collection.optimize(requested, recall=recall, queries=given)
            index = collection._index
            row = {
                "requested": requested,
                "tuned_on": report.get("tuned_on", "-"),
                "index_type": report["index_type"],
                "search": report["search"],
                "build_s": report["build_seconds"],
                "tuning_recall_at_10": report.get("recall_at_10"),
                "bytes_per_vector": round(len(index.serialize()) / index.ntotal, 1),
            }
            found = {}
            for name, q in queries.items():
                ms, found[name] = latencies_ms(index.search, q)
                row[name] = {"recall_at_10": round(recall_at_k(found[name], truth[name]), 4), **timing(ms)}
            if given is not None:  # the odd-numbered real queries: never seen by the tuning
                row["real_unseen_recall_at_10"] = round(recall_at_k(found["real"][1::2], truth["real"][1::2]), 4)
            if index.exact:
                flat_p50, flat_qps = row["real"]["p50_ms"], row["real"]["qps"]
                out["flat_p50_ms_by_n"][n] = flat_p50
            row["speed_vs_flat_p50"] = round(flat_p50 / row["real"]["p50_ms"], 1)
            row["speed_vs_flat_qps"] = round(row["real"]["qps"] / flat_qps, 1)
            out["indexes"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if not index.exact and report["index_type"] not in out["sweeps"]:
                out["sweeps"][report["index_type"]] = sweep(index, real, truth["real"])
        collection.close()
    return out


def sweep(index, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Recall@10 (real queries) and queries/s of ``index`` over a range of nprobe / efSearch."""
    from storage.vector_index import EF_SEARCH_STEPS, NPROBE_STEPS, recall_at_k

    tuned = dict(index.search_params)
    if index.family == "ivf":
        name, steps = "nprobe", [s for s in NPROBE_STEPS if s <= min(index.nlist, 256)]
    else:
        name, steps = "efSearch", [s for s in EF_SEARCH_STEPS if s <= 512]
    points = []
    for value in steps:
        index.search_params = {name: value}
        ms, found = latencies_ms(index.search, queries)
        points.append({name: value, "recall_at_10": round(recall_at_k(found, truth), 4), **timing(ms)})
    index.search_params = tuned
    return points


def synthetic_section(real: np.ndarray, n: int, search: dict, queries: int = 300) -> dict:
    """Memory and latency at ``n`` vectors drawn to match the real set's mean and covariance. No recall."""
    import faiss

    from storage.vector_index import INDEX_TYPE, VectorIndex, resolve_index_type

    rng = np.random.default_rng(SEED)
    mean = real.mean(axis=0)
    factor = np.linalg.cholesky(np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1]))

    def draw(count: int) -> np.ndarray:
        x = (mean + rng.standard_normal((count, real.shape[1])) @ factor.T).astype("float32")
        faiss.normalize_L2(x)
        return x

    vectors = np.concatenate([draw(100_000) for _ in range(0, n, 100_000)])[:n]
    query_vectors = draw(queries)
    out = {
        "n": n,
        "label": "synthetic: Gaussian with the real set's mean and covariance, normalised; no recall",
        "ivf_training_sample": SYNTHETIC_TRAINING,
        "search_params": "as tuned on the real set",
        "indexes": [],
    }
    auto = resolve_index_type("auto", n)
    for index_type in (INDEX_TYPE, auto):
        started = time.perf_counter()
        # a 65,536-vector k-means sample keeps training within minutes on 2 cores (latency, not recall, is measured)
        training = vectors[rng.choice(n, SYNTHETIC_TRAINING, replace=False)] if index_type != INDEX_TYPE else None
        index = VectorIndex.create(
            index_type, real.shape[1], training, search if index_type == auto else None, use_gpu=False
        )
        for start in range(0, n, 100_000):
            index.add(vectors[start : start + 100_000], np.arange(start + 1, min(n, start + 100_000) + 1))
        build = time.perf_counter() - started
        ms, _ = latencies_ms(index.search, query_vectors)
        row = {
            "index_type": index_type,
            "search": dict(index.search_params),
            "build_s": round(build, 1),
            "bytes_per_vector": round(len(index.serialize()) / n, 1),
            **timing(ms),
        }
        out["indexes"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    flat = out["indexes"][0]
    for row in out["indexes"]:
        row["speed_vs_flat_p50"] = round(flat["p50_ms"] / row["p50_ms"], 1)
    return out


def plot(result: dict, path: Path) -> None:
    """Recall@10 on the real queries against queries/s, per index type (sweeps) and as tuned (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = result["real"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {}
    for index_type, points in real["sweeps"].items():
        (line,) = ax.plot(
            [1000 / p["p50_ms"] for p in points], [p["recall_at_10"] for p in points], marker=".", label=index_type
        )
        colours[index_type] = line.get_color()
    for row in real["indexes"]:
        by_queries = row["tuned_on"] == "given queries"
        ax.scatter(
            1000 / row["real"]["p50_ms"],
            row["real"]["recall_at_10"],
            marker="P" if by_queries else "*",
            s=130,
            zorder=3,
            color=colours.get(row["index_type"], "black"),
            edgecolors="black",
            label=f"{row['requested']} = {row['index_type']}"
            + (", exact" if row["tuned_on"] == "-" else ", tuned on real queries" if by_queries else ", tuned"),
        )
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    # the median, not the mean: other jobs on the shared 2 cores add latency spikes that swamp a mean
    ax.set_xlabel("queries/s at the median latency (1000 / p50 ms; one thread, batch 1, k=10)")
    ax.set_ylabel("recall@10 vs exact (383 real queries)")
    ax.set_title(f"MiniLM windows of the carried corpora + Python docs, N={real['n']:,}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encode-minutes", type=float, default=20.0, help="encoding budget (cached runs count)")
    parser.add_argument("--encode-only", action="store_true", help="encode and cache the passage set, then stop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encode-device", default="cpu", help="cpu (ONNX Runtime) or cuda (torch, bf16)")
    parser.add_argument("--longest", type=int, default=3, help="sentences in the longest window")
    parser.add_argument(
        "--docstrings", action="store_true", help="add the prose of the installed packages' docstrings to the set"
    )
    parser.add_argument("--held-out", type=int, default=1000, help="encoded windows kept out of the index as queries")
    parser.add_argument("--types", default="Flat,auto,IVF,Flat,HNSW32", help="index types, after Flat (comma list)")
    parser.add_argument("--recall", type=float, default=0.95, help="recall@10 target of the build-time tuning")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic vectors (0: skip the section)")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench_scale.json")
    args = parser.parse_args()

    import faiss

    texts, keys, sources = passage_set(args.docstrings, args.longest)
    vectors, encode_seconds = encode_cached(texts, args.encode_minutes, args.batch_size, args.encode_device)
    print(f"{len(vectors)} of {len(texts)} windows encoded in {encode_seconds / 60:.1f} min", file=sys.stderr)
    if args.encode_only:
        return
    faiss.omp_set_num_threads(1)
    # "IVF,Flat" is one type: split the list on commas that start a new type
    types = re.findall(r"(auto|Flat|HNSW\d+|IVF[^,]*,[A-Za-z0-9]+)", args.types)
    types = ["Flat"] + [t for t in types if t != "Flat"]  # Flat first: the others are measured against it
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "faiss_threads": 1,
        },
        "passage_set": {
            "windows_available": len(texts),
            "windows_by_source": sources,
            "encoded": len(vectors),
            "encode_minutes": round(encode_seconds / 60, 1),
            "encoder": "minilm, ONNX Runtime, CPU"
            if args.encode_device == "cpu"
            else f"minilm, torch, {args.encode_device}",
        },
        "real": real_section(vectors, texts, keys, args.held_out, types, args.recall),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    if args.synthetic:
        auto = next(r for r in result["real"]["indexes"] if r["requested"] == "auto")
        result["synthetic"] = synthetic_section(vectors, args.synthetic, auto["search"])
        args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
