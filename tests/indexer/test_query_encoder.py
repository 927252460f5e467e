"""Queries encoded from the cached ONNX export with the model's own tokenizer, without torch: the full encoder's
vectors, for the embedded MiniLM and the Stella shape (its prompts, its Dense heads inside the graph)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.encoder import Encoder, OnnxQueryEncoder
from indexer.pipeline import encoder_for_collection
from search_api.cli import main
from search_api.retrieval import Retriever, SearchOptions
from storage.collection import Collection, collection_dir
from tests.helpers.data import cpu_settings, write_jsonl
from tests.helpers.stella_shaped import S2P_QUERY, S2S_QUERY

QUERIES = [
    "what is faiss?",
    "  leading and trailing spaces  ",
    "Ünïcödé queries: naïve café, 東京, emoji 🚀",
    "a much longer query about vector search, FAISS indexes, SQLite storage and how they fit together " * 12,
    "x",
    "mid length query about search engines",
]


def test_minilm_queries_equal_the_full_encoders(minilm):
    fast = OnnxQueryEncoder.for_manifest(minilm.manifest(), cpu_settings(batch_size=4))
    assert fast is not None and minilm.manifest().vectors_compatible_with(fast.manifest())
    np.testing.assert_allclose(fast.encode_queries(QUERIES), minilm.encode_queries(QUERIES), atol=1e-5)
    torch_encoder = Encoder.load("minilm", cpu_settings(backend="torch"))
    np.testing.assert_allclose(fast.encode_queries(QUERIES), torch_encoder.encode_queries(QUERIES), atol=1e-5)


@pytest.mark.parametrize(("dim", "prompt_type", "prompt"), [(256, "s2p", S2P_QUERY), (512, "s2s", S2S_QUERY)])
def test_stella_shaped_queries_get_the_prompt_and_the_head_of_the_full_encoder(tiny_stella, dim, prompt_type, prompt):
    settings = cpu_settings(backend="onnx", prompt_type=prompt_type, batch_size=4)
    full = Encoder.load(str(tiny_stella), settings, dim=dim)  # exports the graph (its head inside) if not cached
    fast = OnnxQueryEncoder.for_manifest(full.manifest(), settings)
    assert fast is not None and fast.query_prompt == prompt == full.query_prompt
    assert fast.head == full.head and fast.dim == dim
    np.testing.assert_allclose(fast.encode_queries(QUERIES), full.encode_queries(QUERIES), atol=1e-5)


def test_without_a_cached_export_or_where_torch_is_asked_for_there_is_no_query_encoder(minilm, tmp_path):
    elsewhere = cpu_settings()
    elsewhere.cache_dir = tmp_path / "empty-cache"
    assert OnnxQueryEncoder.for_manifest(minilm.manifest(), elsewhere) is None
    assert OnnxQueryEncoder.for_manifest(minilm.manifest(), cpu_settings(backend="torch")) is None


def test_cli_search_loads_neither_torch_nor_sentence_transformers_and_finds_what_the_full_encoder_finds(tmp_path):
    records = [
        {"id": "faiss", "text": "FAISS searches dense vectors for their nearest neighbours."},
        {"id": "sqlite", "text": "SQLite keeps the passages and their metadata in one file."},
        {"id": "river", "text": "The Thames flows through London to the North Sea."},
    ]
    data = tmp_path / "data"
    ingest = ["ingest", str(write_jsonl(tmp_path / "docs.jsonl", records)), "--data-dir", str(data)]
    assert CliRunner().invoke(main, [*ingest, "--model", "minilm"]).exit_code == 0
    search = ["search", "which library finds nearest vectors?", "--data-dir", str(data), "-k", "3", "--json"]
    code = (
        "import json, sys\nfrom search_api.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
        "print(json.dumps(heavy), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code, *search], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    found = json.loads(result.stdout)["results"]
    with Collection.open(collection_dir(data, "default")) as collection:
        expected = Retriever(collection, encoder_for_collection(collection, cpu_settings())).search(
            SearchOptions(query=search[1], k=3)
        )
    assert [hit["id"] for hit in found] == [r.hit.document_id for r in expected] and found[0]["id"] == "faiss"
    np.testing.assert_allclose([hit["score"] for hit in found], [r.score for r in expected], atol=1e-5)
