"""GPU ingest: the project's encoder path against the seed baseline on a Stella-shaped random-weight model, both
measured in the same run, written as JSON (item 2 of the performance issue).

The model is built here by ``stella_shaped.py`` (Qwen2 with bidirectional attention loaded through
trust_remote_code, mean pooling, ``2_Dense_*`` heads; ``--shape 1.5b`` is stella_en_1.5B_v5's shape) with a
byte-level BPE tokenizer trained on the corpora, so that real text is cut about as finely as Stella's tokenizer
cuts it. On the same texts:

- **512-token inputs**: the seed baseline (``SentenceTransformer`` in fp32, ``encode(batch_size=16,
  normalize_embeddings=True)``) and the project's ``Encoder.encode_passages`` at each ``--batch-sizes`` (bf16 on
  CUDA, length-sorted batches, pooling, head, normalisation, copy to host): texts/s, tokens/s and MFU (linear and
  attention FLOPs of the bidirectional forward plus the head, against ``--peak-tflops``).
- **Real length distributions**: the passages the project's chunker cuts from each corpus: texts/s against the
  baseline, and the share of computed tokens that were padding (``Encoder.stats``). On CUDA the encoder cuts
  length-sorted batches of up to ``batch_size`` x 512 padded tokens, so ``--batch-sizes`` sets that budget.
- **Host waits** (``host_waits``, CUDA): the synchronising calls torch's sync debug mode reports during one
  encode of the corpus, against its batch count (the encoder's own code waits once per window; the model's may
  add one per batch).
- **The whole ingest** (``ingest``): the same documents through ``ingest_documents`` into a real collection
  (chunking, encoding at the largest budget, SQLite rows, FAISS add, checkpoint): passages/s, and the overhead
  over ``encode_passages`` alone.
- **Compiled** (``--compile``, inductor on CUDA): the same two measurements again with ``encoder.compile``
  (``torch.compile`` of the transformer's forward with dynamic shapes, compiled and warmed up at load; the
  ``project_compiled`` rows and the compile time).
- **A forced CUDA out-of-memory**: all but ``--oom-headroom-gib`` of the free GPU memory is taken by a ballast
  tensor, then the 512-token texts are encoded at the largest budget: the budget must back off
  (``stats.oom_backoffs``) and the call return every vector, equal to an unforced run's (cosine).

    python scripts/bench_gpu.py --out scripts/results/bench_gpu.json                      # on the GPU machine
    python scripts/bench_gpu.py --shape tiny --device cpu --fixed-texts 32 --limit 64 --compile aot_eager \
        --out /tmp/gpu-smoke.json

On the CPU (the smoke run) MFU and the out-of-memory step are left out: they mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def forward_flops_per_token(config, seq_len: int, head_dim_out: int) -> float:
    """FLOPs per token of one bidirectional forward at ``seq_len`` plus the Dense head (multiply-add = 2): Qwen2
    (1.5B) and NewModel (400M, packed QKV and gated MLP: the same products) alike."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim  # NewModel: no GQA
    projections = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter  # q, o; k, v; gate, up, down
    attention = 2 * seq_len * config.num_attention_heads * head_dim  # q.k over every key, then p.v
    return 2 * config.num_hidden_layers * (projections + attention) + 2 * hidden * head_dim_out


def corpus_texts(paths: list[Path], limit: int | None) -> list[tuple[str, list]]:
    from indexer.sources import read_documents

    return [(path.parent.name, list(read_documents(path))[:limit]) for path in paths]


def fixed_length_texts(vocabulary: list[str], n: int, words: int = 900) -> list[str]:
    """``n`` texts of real words, each long enough to fill the 512-token window (the tokenizer truncates)."""
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(n)]


def timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def synchronising_calls(fn) -> int:
    """How many times ``fn`` made the host wait for the GPU (torch's sync debug mode warns at each wait)."""
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1.5b", "400m", "tiny", "tiny-400m"], default="1.5b")
    parser.add_argument(
        "--model-dir", type=Path, help="the shaped folder: reused when already built there, else built there and kept"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--corpora",
        type=Path,
        nargs="+",
        default=[DATA / "msmarco" / "corpus.jsonl", DATA / "scifact" / "corpus.jsonl"],
    )
    parser.add_argument("--limit", type=int, default=2000, help="documents per corpus")
    parser.add_argument("--fixed-texts", type=int, default=256, help="512-token texts")
    parser.add_argument("--batch-sizes", default="16,64,128", help="the project encoder's batch sizes to measure")
    parser.add_argument(
        "--oom-headroom-gib", type=float, default=1.0, help="GPU memory left free for the forced out-of-memory"
    )
    parser.add_argument(
        "--compile",
        default=None,
        help="torch.compile backend for the compiled rows (default: inductor on CUDA, off on the CPU; off skips them)",
    )
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 dense matrix rate of the GPU")
    parser.add_argument("--tokenizer-vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=Path("scripts/results/bench_gpu.json"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from stella_shaped import FULL_1_5B, FULL_400M, build_stella_400m_shaped, build_stella_shaped

    from indexer.chunking import Chunker, text_to_encode
    from indexer.encoder import Encoder, _xformers_on
    from indexer.pipeline import ingest_documents
    from indexer.settings import load_settings
    from storage.collection import Collection

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    corpora = corpus_texts(args.corpora, args.limit)
    all_text = [d.text for _, docs in corpora for d in docs]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir
        built = folder is not None and (folder / "modules.json").exists()
        target = folder or Path(tmp) / f"stella-{args.shape}"  # --model-dir not built yet: built there, kept
        if not built and args.shape.endswith("400m"):  # BERT's WordPiece, as stella_en_400M_v5 has
            shape = FULL_400M if args.shape == "400m" else {}
            folder = build_stella_400m_shaped(target, **shape)
        elif not built:
            shape = FULL_1_5B if args.shape == "1.5b" else {}
            folder = build_stella_shaped(
                target,
                tokenizer_texts=all_text,
                tokenizer_vocab=args.tokenizer_vocab,
                **shape,
            )
        build_s = time.time() - started

        compile_backend = args.compile or ("inductor" if cuda else "off")
        variants = ["eager"] + (["compiled"] if compile_backend != "off" else [])

        def settings(batch_size: int, variant: str):
            encoder = {"batch_size": batch_size, "backend": "torch"}
            if variant == "compiled":
                encoder["compile"] = compile_backend
            return load_settings(cli={"encoder": encoder, "processing": {"device": device}}, environ={})

        encoders: dict[tuple[str, int], Encoder] = {}

        def encoder(batch_size: int, variant: str = "eager") -> Encoder:
            key = (variant, batch_size)
            if key in encoders:
                return encoders[key]
            first = next((e for (v, _), e in encoders.items() if v == variant), None)
            if first is None:  # eager and compiled each load their own weights (compiling patches the model)
                encoders[key] = Encoder.load(str(folder), settings(batch_size, variant), dim=1024)
            else:  # one set of weights per variant; only the batch size differs
                encoders[key] = Encoder(first.model, first.profile, first.head, settings(batch_size, variant), device)
                encoders[key].compile_seconds = first.compile_seconds
            return encoders[key]

        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        project = encoder(batch_sizes[0])
        config = project.model[0].auto_model.config
        flops_512 = forward_flops_per_token(config, 512, project.dim)
        baseline = SentenceTransformer(
            str(folder),
            device=device,
            trust_remote_code=True,
            local_files_only=True,
            # the model card's settings without xformers (400M); none for the 1.5B
            config_kwargs=(project.profile.cpu_config_kwargs if not _xformers_on(device) else None) or None,
        )
        baseline.max_seq_length = 512

        def baseline_encode(texts: list[str]):
            return baseline.encode(texts, batch_size=16, normalize_embeddings=True)

        def rate(texts: list[str], seconds: float, tokens: int, flops_per_token: float | None) -> dict:
            out = {"seconds": round(seconds, 3), "texts_per_s": round(len(texts) / seconds, 1)}
            out["tokens_per_s"] = round(tokens / seconds)
            if cuda and flops_per_token:
                out["mfu"] = round(tokens * flops_per_token / seconds / (args.peak_tflops * 1e12), 4)
            return out

        result = {
            "benchmark": "gpu_ingest",
            "command": "python scripts/bench_gpu.py " + " ".join(os.sys.argv[1:]),
            "shape": args.shape,
            "model": {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads,
                "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
                "intermediate": config.intermediate_size,
                "vocab": config.vocab_size,
                "head": project.head.label,
                "attention": type(project.model[0].auto_model).__name__,
                "dtype": str(next(project.model.parameters()).dtype),
                "tokenizer_vocab": len(project.tokenizer),
                "build_seconds": round(build_s, 1),
            },
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "peak_tflops": args.peak_tflops if cuda else None,
            "flops_per_token_512": flops_512,
            "baseline_what": "SentenceTransformer fp32, encode(batch_size=16, normalize_embeddings=True)",
            "project_what": "Encoder.encode_passages: bf16 on CUDA, length-sorted batches, pooling, head, "
            "normalise, host copy; project_compiled: the same with encoder.compile (torch.compile of the "
            "transformer's forward, dynamic shapes); ingest: ingest_documents into a real collection",
            "fixed_512_tokens": None,
            "real_lengths": [],
            "forced_oom": None,
            "complete": False,
        }

        def save(done: bool = False) -> None:
            """The JSON as far as the run got: written after every step, so that a run cut off by the device's
            10-minute call limit still leaves what it measured."""
            result["minutes"] = round((time.time() - started) / 60, 1)
            result["complete"] = done
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            if done:
                print(json.dumps(result, indent=2))

        # -- 512-token inputs ------------------------------------------------------------------------------------
        vocabulary = sorted({w for text in all_text[:2000] for w in text.split() if w.isalpha()})
        fixed = fixed_length_texts(vocabulary, args.fixed_texts)
        fixed_tokens = sum(min(512, len(ids)) for ids in project.tokenizer(fixed)["input_ids"])
        baseline_encode(fixed[:16])  # warm-up
        fixed_result = {
            "texts": len(fixed),
            "mean_tokens": round(fixed_tokens / len(fixed), 1),
            "baseline": rate(fixed, timed(lambda: baseline_encode(fixed), device), fixed_tokens, flops_512),
        }
        for variant in variants:
            section = fixed_result["project" if variant == "eager" else "project_compiled"] = {}
            for batch_size in batch_sizes:
                enc = encoder(batch_size, variant)
                enc.encode_passages(fixed[:batch_size])  # warm-up at this shape
                before = (enc.stats.tokens, enc.stats.padded_tokens)
                seconds = timed(lambda enc=enc: enc.encode_passages(fixed), device)
                computed = enc.stats.padded_tokens - before[1]
                section[str(batch_size)] = {
                    **rate(fixed, seconds, enc.stats.tokens - before[0], flops_512),
                    "padded_tokens": computed,
                }
        if "compiled" in variants:
            fixed_result["compile_backend"] = compile_backend
            fixed_result["compile_and_warm_up_seconds"] = round(encoder(batch_sizes[0], "compiled").compile_seconds, 1)
        rows = [r for key in ("project", "project_compiled") for r in fixed_result.get(key, {}).values()]
        best = max(rows, key=lambda r: r["texts_per_s"])
        fixed_result["best_vs_baseline"] = round(best["texts_per_s"] / fixed_result["baseline"]["texts_per_s"], 2)
        result["fixed_512_tokens"] = fixed_result
        save()

        # -- real length distributions ---------------------------------------------------------------------------
        real = []
        overlap = project.settings.ingest.chunk_overlap
        chunker = Chunker(project.chunk_tokenizer, project.max_seq_length, overlap, project.passage_prompt)
        for name, documents in corpora:
            texts = [text_to_encode(title, p.text) for title, ps in chunker.split_for_encoding(documents) for p in ps]
            tokens = sum(len(ids) for ids in project.tokenizer(texts, truncation=True, max_length=512)["input_ids"])
            baseline_s = timed(lambda texts=texts: baseline_encode(texts), device)
            entry = {
                "corpus": name,
                "passages": len(texts),
                "mean_tokens": round(tokens / len(texts), 1),
                "baseline": rate(texts, baseline_s, tokens, None),
            }
            for variant in variants:
                section = entry["project" if variant == "eager" else "project_compiled"] = {}
                for batch_size in batch_sizes:
                    enc = encoder(batch_size, variant)
                    before = (enc.stats.tokens, enc.stats.padded_tokens)
                    seconds = timed(lambda enc=enc, texts=texts: enc.encode_passages(texts), device)
                    real_tokens, computed = enc.stats.tokens - before[0], enc.stats.padded_tokens - before[1]
                    section[str(batch_size)] = {
                        **rate(texts, seconds, real_tokens, None),
                        "padding_fraction": round(1 - real_tokens / computed, 4),
                        "vs_baseline": round(baseline_s / seconds, 2),
                    }
            if cuda:  # how often the host waits for the GPU: the encoder itself once per window of 4,096 texts
                enc = encoder(batch_sizes[-1])
                batches_before = enc.stats.batches
                waits = synchronising_calls(lambda enc=enc, texts=texts: enc.encode_passages(texts))
                entry["host_waits"] = {"batches": enc.stats.batches - batches_before, "synchronising_calls": waits}
            # the whole ingest: the same documents chunked, encoded (eager, largest budget), written to a real
            # collection (SQLite rows, FAISS add, checkpoint), against encode_passages alone at that budget
            enc = encoder(batch_sizes[-1])
            collection = Collection.create(Path(tmp) / f"ingest-{name}", enc.manifest())
            try:
                started_ingest = time.perf_counter()  # the vectors are on the host when it returns
                written = ingest_documents(collection, enc, documents, enc.settings, quiet=True).passages_written
                seconds = time.perf_counter() - started_ingest
            finally:
                collection.close()
            encode_s = len(texts) / entry["project"][str(batch_sizes[-1])]["texts_per_s"]
            entry["ingest"] = {
                "batch_size": batch_sizes[-1],
                "passages_written": written,
                "seconds": round(seconds, 3),
                "passages_per_s": round(written / seconds, 1),
                "vs_baseline_encode_alone": round(baseline_s / seconds, 2),
                "overhead_vs_encode_alone": round(seconds / encode_s - 1, 4),
            }
            real.append(entry)
            result["real_lengths"] = real
            save()

        # -- forced out-of-memory --------------------------------------------------------------------------------
        oom = None
        if cuda:
            # Memory is taken away (a ballast tensor leaves --oom-headroom-gib free) rather than asking for a batch
            # too large for the card, so that the out-of-memory happens on any card: the largest budget's first
            # batch cannot fit, the budget must halve until one does, and every vector must still come back.
            enc = encoder(batch_sizes[-1])
            texts = fixed
            unforced = enc.encode_passages(texts)
            enc._cuda_budget_cap = 0
            before = enc.stats.oom_backoffs
            free, _ = torch.cuda.mem_get_info()
            ballast = torch.empty(max(0, free - int(args.oom_headroom_gib * 2**30)), dtype=torch.uint8, device=device)
            try:
                started_oom = time.perf_counter()
                forced = enc.encode_passages(texts)
                seconds = time.perf_counter() - started_oom
            finally:
                del ballast
                torch.cuda.empty_cache()
            backoffs = enc.stats.oom_backoffs - before
            cosine = (forced * unforced).sum(axis=1)
            oom = {
                "headroom_gib": args.oom_headroom_gib,
                "budget_tokens_asked": batch_sizes[-1] * 512,
                "budget_tokens_after": enc._cuda_budget_cap,
                "backoffs": backoffs,
                "forced": backoffs > 0,
                "vectors": list(forced.shape),
                "all_finite": bool(np.isfinite(forced).all()),
                "min_cosine_to_unforced_run": round(float(cosine.min()), 6),
                "seconds": round(seconds, 1),
            }
            if not backoffs:
                print("WARNING: the forced out-of-memory did not happen; lower --oom-headroom-gib")
            result["forced_oom"] = oom

    save(done=True)


if __name__ == "__main__":
    main()
