"""The CLI as a person uses it: what it says when nothing matches, one-line errors, the server's limits, quiet output.

Searches run on a real collection of real dbpedia passages encoded by the packaged MiniLM; the subprocess tests
run the installed ``stella-search`` as a shell would.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from search_api.cli import main
from tests.helpers.data import DATA, read_jsonl, write_jsonl

STELLA = str(Path(sys.executable).parent / "stella-search")
# what the libraries print on their own while a model loads and is exported and quantised to ONNX
LIBRARY_NOISE = (
    "Loading weights",
    "TracerWarning",
    "UserWarning",
    "Quantization parameters for tensor",
    "get_tensor_type",
    "pre-processing before quantization",
    "fusion_base",
    "onnx_model",
    "Batches",
    "it/s]",
)


def search(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["search", *args], env=env)


def test_a_search_without_hits_says_so_and_names_its_filter(dbpedia20, dbpedia20_server):
    misspelt = '{"yaer": 2020}'
    local = search("fictional airline", "--data-dir", str(dbpedia20), "--filter", misspelt)
    remote = search("fictional airline", "--url", dbpedia20_server.url, "--filter", misspelt)
    for result in (local, remote):
        assert result.exit_code == 0, result.output
        assert result.stdout == 'no results in collection default with filter {"yaer": 2020}\n'
    paged = search("fictional airline", "--data-dir", str(dbpedia20), "--offset", "10000")
    assert paged.stdout == "no results past the first 10000 in collection default\n"
    as_json = search("fictional airline", "--data-dir", str(dbpedia20), "--filter", misspelt, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["results"] == []


def test_a_search_with_hits_prints_them_and_no_such_line(dbpedia20):
    result = search("fictional airline", "--data-dir", str(dbpedia20), "-k", "2")
    assert result.exit_code == 0, result.output
    assert "Oceanic Airlines" in result.stdout and "no results" not in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["search"], "Missing argument 'QUERY' (see 'stella-search search --help')"),
        (["search", "x", "-k", "many"], "Invalid value for '-k': 'many' is not a valid integer"),
        (["search", "x", "--mode", "fuzzy"], "Invalid value for '--mode': 'fuzzy' is not one of"),
        (["search", "x", "--colection", "c"], "No such option '--colection'"),
        (["--quiet", "info"], "No such option '--quiet' (see 'stella-search --help')"),
        (["serch", "x"], "No such command 'serch'"),
        (["info", "--config", "missing.yaml"], "Invalid value for '--config': File 'missing.yaml' does not exist"),
        (["search", "x", "--url", "http://127.0.0.1:1", "--model", "minilm"], "--model apply to a local collection"),
        (["ingest", "c.jsonl", "--workers", "2"], "--workers needs --ray (see 'stella-search ingest --help')"),
        (["serve", "--shard-replicas", "2"], "--shard-replicas and --encoder-replicas need --ray"),
    ],
    ids=[
        "missing argument",
        "not an integer",
        "not a choice",
        "unknown option",
        "unknown group option",
        "unknown command",
        "bad path",
        "local option with --url",
        "workers without ray",
        "replicas without ray",
    ],
)
def test_every_usage_error_is_one_line_with_status_2(args, message):
    result = CliRunner().invoke(main, args, prog_name="stella-search")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_are_one_line_from_the_installed_command(tmp_path):
    for args, message in [
        (["search"], "error: Missing argument 'QUERY'"),
        (["search", "x", "-k", "many"], "error: Invalid value for '-k'"),
        (["optimize", "--bogus"], "error: No such option '--bogus'"),
        (["ingest", "c.jsonl", "--workers", "2"], "error: --workers needs --ray"),
    ]:
        result = subprocess.run([STELLA, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr


def test_the_cli_applies_the_servers_query_and_k_limits_with_its_messages(dbpedia20, dbpedia20_server):
    long_query = "word " * 20_000
    refused_by_http = httpx.post(f"{dbpedia20_server.url}/collections/default/search", json={"query": long_query})
    assert refused_by_http.status_code == 400
    refused_here = search(long_query, "--data-dir", str(dbpedia20))
    assert refused_here.exit_code == 2
    assert refused_here.stderr == f"error: {refused_by_http.json()['detail']}\n"
    assert "query has 100000 characters; the limit is 4096" in refused_here.stderr

    too_many = httpx.post(f"{dbpedia20_server.url}/collections/default/search", json={"query": "airline", "k": 1001})
    refused_k = search("airline", "--data-dir", str(dbpedia20), "-k", "1001")
    assert too_many.status_code == 400 and refused_k.exit_code == 2
    assert refused_k.stderr == f"error: {too_many.json()['detail']}\n"

    blank = search("   ", "--data-dir", str(dbpedia20))
    assert blank.exit_code == 2 and blank.stderr == "error: query is empty; send some text to search for\n"


def test_the_limits_come_from_the_settings(dbpedia20):
    env = {"STELLA_SEARCH_SERVER__MAX_QUERY_CHARS": "20", "STELLA_SEARCH_SERVER__MAX_K": "5"}
    long = search("a question of thirty characters", "--data-dir", str(dbpedia20), env=env)
    assert long.exit_code == 2 and "query has 31 characters; the limit is 20" in long.stderr
    deep = search("airline", "--data-dir", str(dbpedia20), "-k", "6", env=env)
    assert deep.exit_code == 2 and "k is 6; it must be between 1 and 5" in deep.stderr
    allowed = search("airline", "--data-dir", str(dbpedia20), "-k", "5", env=env)
    assert allowed.exit_code == 0 and allowed.stdout.count("\n") == 10  # 5 hits of two lines


def test_normal_output_has_no_library_noise_and_verbose_has_it(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=5))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    # a fresh ONNX cache: this ingest exports and quantises the model, which is where the libraries talk most
    env.update(STELLA_SEARCH_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    data = str(tmp_path / "data")

    def run(*args):
        result = subprocess.run([STELLA, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr
        return result

    ingest = run("ingest", str(corpus), "--data-dir", data, "--model", "minilm")
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "the ingest did not export the model"
    assert "5 documents read: 5 added" in ingest.stdout
    assert "exported the model" in ingest.stderr  # our own lines stay
    found = run("search", "fictional airline", "--data-dir", data, "-k", "1")
    assert "1. " in found.stdout
    for result in (ingest, found):
        assert [n for n in LIBRARY_NOISE if n in result.stderr] == [], result.stderr

    # a search encodes with the cached query graph and loads no weights; an ingest loads them
    verbose = run("--verbose", "ingest", str(corpus), "--data-dir", str(tmp_path / "again"), "--model", "minilm")
    assert "Loading weights" in verbose.stderr and "DEBUG" in verbose.stderr
