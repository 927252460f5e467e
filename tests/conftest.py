"""Shared fixtures: the real embedded MiniLM model, a tiny Stella-shaped model built on the fly, real data."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# schemathesis's pytest plugin imports its report writers at the end of the session, when threads the tests
# left (Ray's, servers') may still run; CPython 3.11 before 3.11.8 can then fail the assertion-rewriting parse of
# those modules with "AST constructor recursion depth mismatch" (python/cpython#106905) and end the run with a
# traceback. Import them now, on the main thread alone; allure's writer needs allure-pytest, which the suite does
# not install, so it is marked missing (the ImportError schemathesis expects, without parsing the module again).
import schemathesis.reporting.html.writer  # noqa: E402,F401
import schemathesis.reporting.junitxml  # noqa: E402,F401

if importlib.util.find_spec("allure_commons") is None:
    sys.modules["schemathesis.reporting.allure"] = None

# The BEIR subsets the repository carries (see tests/data/SOURCE.md).
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


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder (ONNX exports, embedding cache) for the session, never the user's own: exported once,
    found by cpu_settings() and, through STELLA_SEARCH_CACHE_DIR, by the CLI and the processes tests start."""
    root = tmp_path_factory.getbasetemp()
    # under pytest-xdist every worker has its own base folder inside the run's: the workers share one cache, as
    # processes of one user do (exports are locked and atomic), so each model is exported once per run
    path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "stella-cache"
    path.mkdir(exist_ok=True)
    os.environ["STELLA_SEARCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def minilm():
    from indexer.encoder import Encoder

    return Encoder.load("minilm", cpu_settings())


@pytest.fixture(scope="session")
def tiny_stella(tmp_path_factory) -> Path:
    from stella_shaped import build_stella_shaped

    return build_stella_shaped(tmp_path_factory.mktemp("models") / "tiny-stella")


@pytest.fixture(scope="session")
def tiny_stella_400m(tmp_path_factory) -> Path:
    from stella_shaped import build_stella_400m_shaped

    return build_stella_400m_shaped(tmp_path_factory.mktemp("models") / "tiny-stella-400m")


@pytest.fixture
def settings():
    return cpu_settings()


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
