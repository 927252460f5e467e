"""The Stella code path, on a tiny Stella-shaped model built by the tests (random Qwen2 weights, real layout).

Each expectation is computed independently with plain transformers + the head's safetensors, so the test
shows the encoder picks the right MRL head, puts prompts on queries only, and normalises.
"""

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from indexer.encoder import Encoder
from indexer.models import available_heads, default_head
from storage.errors import InvalidInputError, ModelUnavailableError
from tests.helpers.data import cpu_settings
from tests.helpers.stella_shaped import S2P_QUERY, S2S_QUERY


def reference(folder, text: str, head: int, keep: int | None = None, **config_kwargs) -> np.ndarray:
    """mean-pool(model(text)) -> 2_Dense_{head} -> [:keep] -> L2-normalise, without sentence-transformers (the
    folder's own code, bidirectional Qwen2 or NewModel, as Stella's is loaded: trust_remote_code)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **config_kwargs).eval()
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    weights = load_file(str(folder / f"2_Dense_{head}" / "model.safetensors"))
    projected = pooled @ weights["linear.weight"].T + weights["linear.bias"]
    if keep:
        projected = projected[:, :keep]
    return torch.nn.functional.normalize(projected, dim=1).numpy()[0]


def load(folder, dim=None, **encoder):
    return Encoder.load(str(folder), cpu_settings(**encoder), dim=dim)


def test_the_folder_looks_like_stella(tiny_stella):
    assert available_heads(tiny_stella) == {256: "2_Dense_256", 768: "2_Dense_768", 1024: "2_Dense_1024"}
    assert default_head(tiny_stella) == "2_Dense_1024"


def test_the_encoder_attends_both_ways_as_stella_does(tiny_stella):
    """Stella 1.5B's own code (loaded with trust_remote_code) makes Qwen2's attention bidirectional; so does the
    shaped folder's: the first token's state depends on a later token, and padding changes nothing."""
    encoder = load(tiny_stella)
    model = encoder.model[0].auto_model
    assert type(model).__name__ == "BidirectionalQwen2Model"
    tokenizer = encoder.tokenizer
    texts = ["Vector search finds the nearest passages", "Vector search finds the nearest FAISS"]
    pair = tokenizer(texts, padding=True)
    pair = {k: torch.tensor(v) for k, v in pair.items()}
    with torch.no_grad():
        hidden = model(**pair).last_hidden_state
    assert (hidden[0, 0] - hidden[1, 0]).abs().max() > 1e-3  # a causal model would give the same first token
    short = "Vector search"
    padded = tokenizer([short, "Vector search finds the passages nearest to a query embedding."], padding=True)
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).last_hidden_state[0]
        batch = model(**{k: torch.tensor(v) for k, v in padded.items()}).last_hidden_state[0, : len(alone)]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [256, 768, 1024])
def test_each_dim_uses_its_own_head(tiny_stella, dim):
    encoder = load(tiny_stella, dim=dim)
    passage = "FAISS searches dense vectors."
    vector = encoder.encode_passages([passage])[0]
    assert encoder.head.label == f"2_Dense_{dim}"
    assert vector.shape == (dim,)
    np.testing.assert_allclose(vector, reference(tiny_stella, passage, dim), atol=1e-5)


def test_default_dim_is_the_head_modules_json_wires(tiny_stella):
    encoder = load(tiny_stella)
    assert (encoder.dim, encoder.head.label) == (1024, "2_Dense_1024")


def test_a_smaller_head_is_not_a_prefix_of_a_larger_one(tiny_stella):
    text = "Matryoshka heads are separate layers."
    own_head = reference(tiny_stella, text, 256)
    prefix_of_1024 = reference(tiny_stella, text, 1024, keep=256)
    assert np.abs(own_head - prefix_of_1024).max() > 1e-2


def test_dim_without_a_head_truncates_the_next_larger_head(tiny_stella):
    encoder = load(tiny_stella, dim=512)
    text = "Five hundred and twelve dimensions."
    vector = encoder.encode_passages([text])[0]
    assert encoder.head.label == "2_Dense_768[:512]"
    np.testing.assert_allclose(vector, reference(tiny_stella, text, 768, keep=512), atol=1e-5)
    assert encoder.manifest().head == "2_Dense_768[:512]"


def test_s2p_prompts_queries_and_not_passages(tiny_stella):
    encoder = load(tiny_stella, dim=256)
    assert encoder.query_prompt == S2P_QUERY and encoder.passage_prompt is None
    text = "what is a vector index"
    np.testing.assert_allclose(
        encoder.encode_queries([text])[0], reference(tiny_stella, S2P_QUERY + text, 256), atol=1e-5
    )
    np.testing.assert_allclose(encoder.encode_passages([text])[0], reference(tiny_stella, text, 256), atol=1e-5)


def test_s2s_prompts_both_sides(tiny_stella):
    encoder = load(tiny_stella, dim=256, prompt_type="s2s")
    text = "a sentence to compare"
    expected = reference(tiny_stella, S2S_QUERY + text, 256)
    np.testing.assert_allclose(encoder.encode_queries([text])[0], expected, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_passages([text])[0], expected, atol=1e-5)


def test_outputs_are_normalised_and_batches_do_not_change_them(tiny_stella):
    encoder = load(tiny_stella, dim=768, batch_size=2)
    texts = ["short", "a somewhat longer passage of text", "mid length text", "x " * 40]
    batched = encoder.encode_passages(texts)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([encoder.encode_passages([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_the_device_side_token_budget_path_gives_the_fixed_batch_vectors(tiny_stella, monkeypatch):
    """The CUDA bulk path, run on the CPU: windows tokenised ahead on the worker thread (the first one prefetched
    as the pipelined ingest asks for it), each window's tokens moved to the device once and batches cut there,
    vectors gathered there and copied back once per window. Windows of 4 texts and a 64-token budget make
    several windows of several batches; every vector lands in its text's row, equal to the seed-style fixed
    batches', and the token counts are the batches' own."""
    import threading

    import indexer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "TOKENISE_WINDOW", 4)
    encoder = load(tiny_stella, dim=768, backend="torch", batch_size=3)
    texts = [f"passage {i} about vector search " * (1 + (i * 5) % 7) for i in range(11)]
    fixed = encoder.encode_passages(texts)  # torch on the CPU: fixed batches of 3, transferred per batch

    calls = []
    preprocess = encoder.model.preprocess

    def recording(window, *args, **kwargs):  # the real tokenizer, noting which thread tokenised which window
        calls.append((threading.current_thread().name, window[0]))
        return preprocess(window, *args, **kwargs)

    monkeypatch.setattr(encoder.model, "preprocess", recording)
    inline = list(encoder._tokenised_windows(texts, None))  # on the CPU: nothing ahead, all on this thread
    assert [first for first, _ in inline] == [0, 4, 8] and {name for name, _ in calls} == {"MainThread"}

    encoder._tokenise_ahead = True  # as on CUDA
    calls.clear()
    ahead = list(encoder._tokenised_windows(texts, None))
    assert [name.startswith("encode-tokenise") for name, _ in calls] == [False, True, True]  # the first inline
    for (_, a), (_, b) in zip(ahead, inline):
        assert torch.equal(a["input_ids"], b["input_ids"])

    lengths = [len(ids) for ids in encoder.tokenizer(texts)["input_ids"]]
    before = (encoder.stats.tokens, encoder.stats.padded_tokens, encoder.stats.batches)
    calls.clear()
    encoder.prefetch_passages(texts)  # the pipelined ingest's call for the next commit batch
    out = np.zeros((len(texts), encoder.dim), dtype="float32")
    encoder._encode_by_token_budget(texts, encoder.passage_prompt, out, budget=64)
    assert [(name.startswith("encode-tokenise"), text) for name, text in calls] == [
        (True, texts[0]),
        (True, texts[4]),
        (True, texts[8]),
    ]
    np.testing.assert_allclose(out, fixed, atol=1e-5)
    assert encoder.stats.batches - before[2] > 3  # several batches per window
    assert encoder.stats.tokens - before[0] == sum(lengths)
    assert sum(lengths) < encoder.stats.padded_tokens - before[1] <= (encoder.stats.batches - before[2]) * 64


def test_an_out_of_memory_on_the_device_path_halves_the_budget_and_every_vector_comes_back(tiny_stella, monkeypatch):
    """No GPU here, so the out-of-memory is injected: the forward raises torch's own CUDA OutOfMemoryError for
    any batch over 100 padded tokens (texts of 17-48 tokens). The budget halves until batches fit, the rest of the
    window is cut again, later windows start from the backed-off budget, and every vector still lands in its row."""
    import indexer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "TOKENISE_WINDOW", 4)
    encoder = load(tiny_stella, dim=768, backend="torch", batch_size=3)
    texts = [f"passage {i} about vector search " * (1 + (i * 5) % 3) for i in range(11)]
    fixed = encoder.encode_passages(texts)
    forward, too_large = encoder._forward, []

    def forward_with_little_memory(batch):
        padded = batch["attention_mask"].numel()
        if padded > 100:
            too_large.append(padded)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(batch)

    monkeypatch.setattr(encoder, "_forward", forward_with_little_memory)
    out = np.zeros((len(texts), encoder.dim), dtype="float32")
    before = encoder.stats.oom_backoffs
    encoder._encode_by_token_budget(texts, None, out, budget=400)
    np.testing.assert_allclose(out, fixed, atol=1e-5)
    # 400 -> 200 -> 100 in the first window; the later windows start at 100 and never run out again
    assert encoder.stats.oom_backoffs - before == len(too_large) == 2
    assert encoder._cuda_budget_cap == 100  # and the next call starts there


def test_a_dim_above_every_head_is_refused(tiny_stella):
    with pytest.raises(InvalidInputError, match=r"--dim 9000 is not available.*\[256, 768, 1024\]"):
        load(tiny_stella, dim=9000)


def test_minilm_has_no_prompts_and_384_dims(minilm):
    assert minilm.dim == 384 and minilm.query_prompt is None and minilm.passage_prompt is None
    fp32 = Encoder.load("minilm", cpu_settings(backend="torch"))  # the default's passages are int8, queries fp32
    np.testing.assert_allclose(fp32.encode_queries(["same text"]), fp32.encode_passages(["same text"]))


def test_minilm_dims_above_native_are_refused_and_below_truncate():
    with pytest.raises(InvalidInputError, match="no MRL heads and gives 384 dims"):
        Encoder.load("minilm", cpu_settings(), dim=1024)
    small = Encoder.load("minilm", cpu_settings(), dim=128)
    full = Encoder.load("minilm", cpu_settings())
    text = ["truncation keeps the leading dimensions"]
    expected = full.encode_passages(text)[0][:128]
    np.testing.assert_allclose(small.encode_passages(text)[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert small.head.label == "native[:128]"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="unknown model 'stella-7b'.*minilm"):
        Encoder.load("stella-7b", cpu_settings())


def test_stella_offline_without_weights_fails_fast_with_directions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailableError, match=r"stella_en_1.5B_v5.*--model minilm"):
        Encoder.load("stella-1.5b", cpu_settings())


def test_embedding_cache_skips_the_model_for_seen_texts(tmp_path):
    settings = cpu_settings()
    settings.embedding.cache_embeddings = True
    settings.embedding.cache_dir = tmp_path / "cache"
    first = Encoder.load("minilm", settings)
    vectors = first.encode_passages(["cached text one", "cached text two"])
    second = Encoder.load("minilm", settings)
    again = second.encode_passages(["cached text one", "cached text two"])
    assert second.stats.texts == 0
    np.testing.assert_array_equal(vectors, again)


@pytest.mark.parametrize("model, dim", [("minilm", None), ("tiny", 256), ("tiny", 512)])
def test_the_onnx_backend_gives_the_torch_vectors(tiny_stella, tmp_path, model, dim):
    name = str(tiny_stella) if model == "tiny" else "minilm"
    texts = ["a short one", "a much longer passage about vector search, FAISS and SQLite storage", "mid length text"]
    torch_encoder = Encoder.load(name, cpu_settings(batch_size=2, backend="torch"), dim=dim)
    onnx_encoder = Encoder.load(name, cpu_settings(batch_size=2, backend="onnx", onnx_dir=str(tmp_path)), dim=dim)
    np.testing.assert_allclose(onnx_encoder.encode_passages(texts), torch_encoder.encode_passages(texts), atol=1e-5)
    np.testing.assert_allclose(onnx_encoder.encode_queries(texts), torch_encoder.encode_queries(texts), atol=1e-5)
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, then reused
    Encoder.load(name, cpu_settings(backend="onnx", onnx_dir=str(tmp_path)), dim=dim)
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_a_compiled_forward_gives_the_eager_vectors_for_every_batch_shape(tiny_stella):
    """encoder.compile traces the shaped model's bidirectional forward with dynamic shapes (the aot_eager backend:
    TorchDynamo and AOTAutograd, eager kernels, no C++ build in the tests) and warms it up at load; vectors of
    batches of other sizes and lengths than the warm-up's still equal the eager encoder's."""
    from torch._dynamo.utils import counters

    eager = load(tiny_stella, backend="torch")
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = load(tiny_stella, backend="torch", compile="aot_eager")
    assert counters["stats"]["unique_graphs"] > graphs_before  # the forward really went through TorchDynamo
    assert compiled.compile_seconds > 0 and compiled.stats.texts == 0  # the warm-up is not counted
    after_warm_up = counters["stats"]["unique_graphs"]
    texts = [f"passage {i} about vector search " * (1 + i % 7) for i in range(11)]
    np.testing.assert_allclose(compiled.encode_passages(texts), eager.encode_passages(texts), atol=1e-5)
    np.testing.assert_allclose(compiled.encode_queries(texts[:1]), eager.encode_queries(texts[:1]), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == after_warm_up  # new shapes, no new compilation


def test_compile_with_backend_auto_is_skipped_where_auto_picks_onnx():
    """One config for GPU and CPU machines: on the CPU, auto picks ONNX Runtime for MiniLM, which has nothing to
    compile, so compile is skipped there rather than refused."""
    encoder = Encoder.load("minilm", cpu_settings(backend="auto", compile="inductor"))
    assert encoder.settings.encoder.backend == "onnx-int8" and encoder.settings.encoder.compile == "off"


def test_compile_settings_that_cannot_work_are_refused(tiny_stella):
    with pytest.raises(InvalidInputError, match="not a torch.compile backend"):
        load(tiny_stella, backend="torch", compile="no-such-backend")
    with pytest.raises(InvalidInputError, match="applies to the torch backend"):
        load(tiny_stella, backend="onnx", compile="aot_eager")


NO_XFORMERS = {"use_memory_efficient_attention": False, "unpad_inputs": False}


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="the refusal needs xformers absent")
def test_the_400m_shape_asks_for_xformers_and_the_encoder_turns_it_off(tiny_stella_400m):
    """stella_en_400M_v5's config asks for xformers memory-efficient attention on unpadded inputs and its code
    refuses to build without xformers; the model card's config_kwargs turn both off. The shaped NewModel folder
    behaves the same, and the encoder (here loading it as a local folder) passes those kwargs."""
    from sentence_transformers import SentenceTransformer

    with pytest.raises(ImportError, match="xformers"):
        SentenceTransformer(str(tiny_stella_400m), trust_remote_code=True, local_files_only=True, device="cpu")
    encoder = load(tiny_stella_400m, backend="torch")
    model = encoder.model[0].auto_model
    assert type(model).__name__ == "NewShapedModel"
    assert not model.config.use_memory_efficient_attention and not model.config.unpad_inputs
    assert encoder.query_prompt == S2P_QUERY and encoder.passage_prompt is None
    text = "Stella 400M encodes passages with BERT's uncased WordPiece"
    np.testing.assert_allclose(
        encoder.encode_passages([text])[0], reference(tiny_stella_400m, text, 1024, **NO_XFORMERS), atol=1e-5
    )
    small = load(tiny_stella_400m, dim=256, backend="torch")
    np.testing.assert_allclose(
        small.encode_passages([text])[0], reference(tiny_stella_400m, text, 256, **NO_XFORMERS), atol=1e-5
    )


def test_the_400m_shape_attends_both_ways_and_ignores_padding(tiny_stella_400m):
    encoder = load(tiny_stella_400m, backend="torch")
    model, tokenizer = encoder.model[0].auto_model, encoder.tokenizer
    pair = tokenizer(["vector search finds passages", "vector search finds documents"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**pair).last_hidden_state
    assert (hidden[0, 1] - hidden[1, 1]).abs().max() > 1e-3  # "vector" sees the last word
    texts = ["a short passage", "a much longer passage about vector search with FAISS and SQLite " * 4]
    batched = encoder.encode_passages(texts)
    alone = np.stack([encoder.encode_passages([t])[0] for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
