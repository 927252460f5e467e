"""The data and settings the tests share: the BEIR subsets the repository carries (``tests/data``, see its
SOURCE.md), JSONL files, slices of a data set, and settings for MiniLM on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def cpu_settings(**encoder):
    from indexer.settings import load_settings

    cli = {"cache_dir": os.environ["STELLA_SEARCH_CACHE_DIR"], "processing": {"device": "cpu"}}
    return load_settings(cli={**cli, "encoder": {"model": "minilm", **encoder}}, environ={})


def server_settings(data_dir, **server):
    """MiniLM on the CPU, collections under ``data_dir``, ``server`` section overrides."""
    settings = cpu_settings()
    settings.data_dir = data_dir
    for key, value in server.items():
        setattr(settings.server, key, value)
    return settings


def downgrade_to_schema_v1(collection_path: Path) -> None:
    """Make a collection look as it did before the lexical index existed (schema 1)."""
    import sqlite3

    conn = sqlite3.connect(collection_path / "collection.db")
    for name in ("passages_fts_insert", "passages_fts_delete"):
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE passages_fts")
    conn.execute("UPDATE manifest SET schema_version = 1")
    conn.commit()
    conn.close()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if limit and len(out) >= limit:
                break
    return out


def slice_dataset(name: str, out: Path, queries: int = 4, extra_docs: int = 150):
    """A BEIR slice of ``tests/data/<name>`` written to ``out``: the first ``queries`` judged queries, every document
    judged for them, plus the first ``extra_docs`` others (distractors)."""
    from indexer.evaluation import BeirDataset

    full = BeirDataset.load(DATA / name)
    chosen = list(full.queries)[:queries]
    judged = {doc for q in chosen for doc in full.qrels[q]}
    corpus = read_jsonl(full.corpus)
    kept = [r for r in corpus if r["_id"] in judged]
    kept += [r for r in corpus if r["_id"] not in judged][:extra_docs]
    (out / "qrels").mkdir(parents=True)
    write_jsonl(out / "corpus.jsonl", kept)
    write_jsonl(out / "queries.jsonl", [{"_id": q, "text": full.queries[q]} for q in chosen])
    rows = [f"{q}\t{d}\t{s}" for q in chosen for d, s in full.qrels[q].items()]
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return BeirDataset.load(out)


def ingest_records(root: Path, records: list[dict], collection: str = "default") -> Path:
    """``records`` written to ``root/corpus.jsonl`` and ingested with MiniLM on the CPU into ``root/data`` as
    ``collection``; returns the data folder."""
    from indexer.pipeline import ingest_paths

    corpus = write_jsonl(root / "corpus.jsonl", records)
    ingest_paths([corpus], root / "data", collection, cpu_settings(), model="minilm")
    return root / "data"
