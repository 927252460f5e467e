"""The cache of ONNX exports: one folder per user whatever the working directory, one export however many
processes need it at once, and nothing half-written that a later start would load."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from indexer.encoder import Encoder
from tests.helpers.data import cpu_settings, write_jsonl

STELLA = str(Path(sys.executable).with_name("stella-search"))
EXPORTED = "exported the model for ONNX Runtime"
# loads the embedded model on ONNX Runtime (fp32) with the cache in argv[1], logging to stderr
LOAD_ONNX = """
import logging, sys
from indexer.encoder import Encoder
from indexer.settings import load_settings
logging.basicConfig(level=logging.INFO)
cli = {"cache_dir": sys.argv[1], "processing": {"device": "cpu"}, "encoder": {"model": "minilm", "backend": "onnx"}}
Encoder.load("minilm", load_settings(cli=cli, environ={}))
"""


def start_loading(cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LOAD_ONNX, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def graphs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "onnx").glob("*.onnx") if not p.name.startswith("."))


def temporary_files(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "onnx").glob(".*"))


def test_the_cli_caches_exports_in_the_users_cache_folder_not_the_working_directory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "FAISS searches dense vectors."}])
    env = {k: v for k, v in os.environ.items() if k != "STELLA_SEARCH_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")  # where the platform puts a user's caches (Linux)
    args = [STELLA, "ingest", str(corpus), "--data-dir", str(tmp_path / "data"), "--model", "minilm"]
    result = subprocess.run(args + ["--backend", "onnx"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert list(elsewhere.iterdir()) == []  # no .stella-cache (nor anything else) where it ran
    assert len(graphs(tmp_path / "user-cache" / "stella-search")) == 1


def test_processes_that_need_the_same_export_at_once_share_one(tmp_path):
    cache = tmp_path / "cache"
    loading = [start_loading(cache) for _ in range(2)]
    logs = [process.communicate(timeout=600)[1] for process in loading]
    assert [process.returncode for process in loading] == [0, 0], logs
    assert sum(log.count(EXPORTED) for log in logs) == 1, logs
    assert len(graphs(cache)) == 1 and temporary_files(cache) == []


def test_an_export_killed_midway_leaves_nothing_a_later_start_loads(tmp_path, caplog):
    cache = tmp_path / "cache"
    exporting = start_loading(cache)
    while not temporary_files(cache):  # the trace is written, the fused graph not yet
        assert exporting.poll() is None, "the export finished before it could be interrupted"
        time.sleep(0.01)
    exporting.send_signal(signal.SIGKILL)
    exporting.wait()
    assert graphs(cache) == [] and temporary_files(cache) != []

    restart = start_loading(cache)
    log = restart.communicate(timeout=600)[1]
    assert restart.returncode == 0, log
    assert log.count(EXPORTED) == 1 and "left by an interrupted export" in log
    assert len(graphs(cache)) == 1 and temporary_files(cache) == []

    settings = cpu_settings(backend="onnx")
    settings.cache_dir = cache
    with caplog.at_level("INFO", logger="indexer.onnx_backend"):
        Encoder.load("minilm", settings)
    assert EXPORTED not in caplog.text  # the next start loads the finished export
