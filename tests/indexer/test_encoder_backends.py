"""The ONNX Runtime paths: token-budget batching, the int8 graph, and what a collection records about them."""

import re

import numpy as np
import pytest

from indexer.chunking import Chunker, text_to_encode
from indexer.encoder import Encoder, padding_capped_batches
from indexer.onnx_backend import GRAPH_VERSION
from indexer.pipeline import encoder_for_collection
from indexer.sources import read_documents
from storage.collection import Collection
from tests.helpers.data import DATA, cpu_settings

TEXTS = [
    "short",
    "a much longer passage about vector search, FAISS indexes and SQLite storage, long enough to need a batch",
    "mid length text about search",
    "x " * 120,
    "another short one",
    "FAISS searches dense vectors.",
]


@pytest.fixture(scope="module")
def passages() -> list[str]:
    """Real msmarco passages, the kind of text the int8 graph has to keep close to fp32."""
    documents = list(read_documents(DATA / "msmarco" / "corpus.jsonl"))[:64]
    return [d.text for d in documents]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """One export (and one int8 graph) per model for the whole module."""
    return tmp_path_factory.mktemp("onnx")


def onnx_settings(onnx_dir, **encoder):
    return cpu_settings(onnx_dir=str(onnx_dir), **encoder)


def test_token_budget_batches_cover_every_text_once_within_the_budget(onnx_dir):
    encoder = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx", max_batch_tokens=64))
    batches = encoder.token_budget_batches(TEXTS)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(TEXTS)))
    lengths = [len(ids) for ids in encoder.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64
    assert len(batches) > 2  # the budget really splits this list


def padding(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    return 1 - lengths.sum() / sum(len(b) * lengths[b].max() for b in batches)


def test_cuda_batches_cap_their_padding_on_real_passage_lengths(minilm):
    """The CUDA cut (padding_capped_batches) on the lengths of 2,000 chunked msmarco documents at the budget of
    batch 128 x 512 tokens: every passage once, within the budget, each batch that holds 4,096 real tokens
    within 3% padding, and the whole far below what filling every batch to the budget pads."""
    documents = list(read_documents(DATA / "msmarco" / "corpus.jsonl"))[:2000]
    chunker = Chunker(minilm.chunk_tokenizer, 512, 32, None)
    texts = [text_to_encode(title, p.text) for title, ps in chunker.split_for_encoding(documents) for p in ps]
    lengths = np.array([len(ids) for ids in minilm.tokenizer(texts, truncation=True, max_length=512)["input_ids"]])
    budget = 128 * 512
    batches = padding_capped_batches(lengths, budget, min_tokens=4096, max_padding=0.03)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(texts)))
    for batch in batches:
        width, real = lengths[batch].max(), lengths[batch].sum()
        assert len(batch) * width <= budget
        if real - lengths[batch[-1]] >= 4096:  # it held min_tokens before its last text joined
            assert 1 - real / (len(batch) * width) <= 0.03
    filled = padding_capped_batches(lengths, budget, min_tokens=budget, max_padding=0.0)  # cap never applies
    assert padding(lengths, batches) < 0.05 < padding(lengths, filled)


def test_token_budget_batching_keeps_the_order_and_the_vectors(onnx_dir):
    encoder = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx", max_batch_tokens=64))
    batched = encoder.encode_passages(TEXTS)
    one_by_one = np.stack([encoder.encode_passages([text])[0] for text in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    torch_vectors = Encoder.load("minilm", cpu_settings(backend="torch")).encode_passages(TEXTS)
    np.testing.assert_allclose(batched, torch_vectors, atol=1e-5)


def test_the_encoder_counts_real_and_padded_tokens(onnx_dir):
    """``stats.tokens`` / ``padded_tokens``: what the padding figures of the benchmarks are made of. Fixed batches
    pad every text to the batch's longest; token-budget batches, sorted by length, pad less."""
    lengths = [len(ids) for ids in Encoder.load("minilm", cpu_settings()).tokenizer(TEXTS)["input_ids"]]
    fixed = Encoder.load("minilm", cpu_settings(backend="torch", batch_size=len(TEXTS)))
    fixed.encode_passages(TEXTS)
    assert (fixed.stats.tokens, fixed.stats.padded_tokens) == (sum(lengths), len(TEXTS) * max(lengths))
    budget = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx", max_batch_tokens=64))
    budget.encode_passages(TEXTS)
    assert budget.stats.tokens == sum(lengths)
    assert budget.stats.padding_fraction < fixed.stats.padding_fraction


def test_int8_passage_vectors_stay_close_to_fp32_and_queries_stay_fp32(onnx_dir, passages):
    fp32 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx"))
    int8 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx-int8"))
    cosine = (int8.encode_passages(passages) * fp32.encode_passages(passages)).sum(axis=1)
    assert cosine.min() > 0.99
    assert cosine.mean() < 0.99999  # really quantised, not the fp32 graph again
    np.testing.assert_allclose(int8.encode_queries(passages[:8]), fp32.encode_queries(passages[:8]), atol=1e-5)
    exported = sorted(p.name for p in onnx_dir.glob("*.onnx") if p.name.startswith(fp32.fingerprint))
    graph = f"{fp32.fingerprint}.{GRAPH_VERSION}"
    assert exported == [f"{graph}.{int8.precision}.onnx", f"{graph}.onnx"]
    assert int8.fingerprint != fp32.fingerprint  # the embedding cache never hands int8 vectors to fp32 encodes


def test_half_precision_vectors_are_recorded_as_such_and_cached_apart(tmp_path, onnx_dir, caplog):
    """On CUDA the torch model runs in bf16; no GPU here, so the same cast is made on the CPU. Such vectors were
    recorded as fp32 and shared fp32's embedding-cache key."""
    import torch

    fp32 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="torch"))
    bf16 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="torch"))
    bf16.model.to(torch.bfloat16)  # what Encoder.load does on CUDA
    assert (fp32.precision, bf16.precision, bf16.manifest().precision) == ("fp32", "bf16", "bf16")
    assert bf16.fingerprint != fp32.fingerprint  # the embedding cache keeps their vectors apart
    a, b = fp32.encode_passages(TEXTS), bf16.encode_passages(TEXTS)
    assert b.dtype == np.float32 and (a * b).sum(axis=1).min() > 0.98
    # a collection a GPU made in bf16 gets fp32 (never int8) passage vectors on the CPU, and the mix is logged
    with Collection.create(tmp_path / "bf16", bf16.manifest()) as collection, caplog.at_level("INFO"):
        assert encoder_for_collection(collection, onnx_settings(onnx_dir)).precision == "fp32"
    assert "holds bf16 passage vectors; passages written here (cpu) will be fp32" in caplog.text


def test_a_collection_keeps_the_precision_it_was_created_with(tmp_path, onnx_dir):
    int8_settings = onnx_settings(onnx_dir, backend="onnx-int8")
    int8 = Encoder.load("minilm", int8_settings)
    fp32_collection = Collection.create(
        tmp_path / "fp32", Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx")).manifest()
    )
    int8_collection = Collection.create(tmp_path / "int8", int8.manifest())
    assert (fp32_collection.manifest.precision, int8_collection.manifest.precision) == ("fp32", int8.precision)
    assert int8.precision.startswith("int8-")
    # an fp32 collection opened where int8 is configured still gets fp32 passage vectors, and the reverse
    assert encoder_for_collection(fp32_collection, int8_settings).precision == "fp32"
    assert encoder_for_collection(int8_collection, onnx_settings(onnx_dir, backend="onnx")).precision == int8.precision
    fp32_collection.close()
    int8_collection.close()
    with Collection.open(tmp_path / "int8") as reopened:
        assert reopened.manifest.precision == int8.precision


def test_the_tiny_stella_model_runs_int8(tiny_stella, onnx_dir):
    texts = ["a short one", "a much longer passage about vector search, FAISS and SQLite storage", "mid length"]
    fp32 = Encoder.load(str(tiny_stella), onnx_settings(onnx_dir, backend="torch"), dim=256)
    int8 = Encoder.load(str(tiny_stella), onnx_settings(onnx_dir, backend="onnx-int8"), dim=256)
    cosine = (int8.encode_passages(texts) * fp32.encode_passages(texts)).sum(axis=1)
    assert cosine.min() > 0.99
    np.testing.assert_allclose(int8.encode_queries(texts), fp32.encode_queries(texts), atol=1e-5)


def test_bert_graphs_are_fused_and_int8_quantises_the_fused_attention(onnx_dir, passages):
    """MiniLM's export is ONNX Runtime's fused rewrite (Attention, SkipLayerNormalization...), and the int8 graph
    quantises the fused attention's Q/K/V weights (QAttention) and every MatMul but the FFN down projections."""
    import onnx

    fp32 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx"))
    int8 = Encoder.load("minilm", onnx_settings(onnx_dir, backend="onnx-int8"))
    graph = onnx_dir / f"{fp32.fingerprint}.{GRAPH_VERSION}"
    fused = [n.op_type for n in onnx.load(f"{graph}.onnx").graph.node]
    assert fused.count("Attention") == 6 and "SkipLayerNormalization" in fused
    quantised = onnx.load(f"{graph}.{int8.precision}.onnx").graph.node
    assert sum(n.op_type == "QAttention" for n in quantised) == 6
    ffn_down = [n for n in quantised if re.search(r"layer\.\d+/output/dense/MatMul$", n.name)]
    assert len(ffn_down) == 6 and all(n.op_type == "MatMul" for n in ffn_down)
    assert len([n for n in quantised if n.op_type == "MatMulInteger"]) == 12  # attention out + FFN up
    torch_vectors = Encoder.load("minilm", cpu_settings(backend="torch")).encode_passages(passages[:32])
    np.testing.assert_allclose(fp32.encode_passages(passages[:32]), torch_vectors, atol=1e-5)
