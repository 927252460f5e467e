"""Shared fixtures: the suite's cache folder, the real embedded MiniLM model, tiny Stella-shaped models built on the
fly. Helpers that tests import are in ``tests/helpers/``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.helpers.data import DATA, cpu_settings, ingest_records, read_jsonl, server_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# schemathesis's pytest plugin imports its report writers at the end of the session, when threads the tests
# left (Ray's, servers') may still run; CPython 3.11 before 3.11.8 can then fail the assertion-rewriting parse of
# those modules with "AST constructor recursion depth mismatch" (python/cpython#106905) and end the run with a
# traceback. Import them now, on the main thread alone; allure's writer needs allure-pytest, which the suite does
# not install, so it is marked missing (the ImportError schemathesis expects, without parsing the module again).
import schemathesis.reporting.html.writer  # noqa: E402,F401
import schemathesis.reporting.junitxml  # noqa: E402,F401

if importlib.util.find_spec("allure_commons") is None:
    sys.modules["schemathesis.reporting.allure"] = None


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
    from tests.helpers.stella_shaped import build_stella_shaped

    return build_stella_shaped(tmp_path_factory.mktemp("models") / "tiny-stella")


@pytest.fixture(scope="session")
def tiny_stella_400m(tmp_path_factory) -> Path:
    from tests.helpers.stella_shaped import build_stella_400m_shaped

    return build_stella_400m_shaped(tmp_path_factory.mktemp("models") / "tiny-stella-400m")


@pytest.fixture
def settings():
    return cpu_settings()


@pytest.fixture(scope="module")
def dbpedia20(tmp_path_factory) -> Path:
    """A data folder whose collection ``default`` holds the first 20 dbpedia documents (MiniLM), one per module."""
    return ingest_records(tmp_path_factory.mktemp("dbpedia20"), read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=20))


@pytest.fixture(scope="module")
def dbpedia20_server(dbpedia20):
    """A server (default settings, MiniLM on the CPU) over ``dbpedia20``."""
    from tests.helpers.server import RunningServer

    with RunningServer(server_settings(dbpedia20)) as running:
        yield running
