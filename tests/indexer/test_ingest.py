"""Ingest: chunking, idempotent re-ingest, replacement, restart, title-only and empty records, and bad input
rejected whole."""

import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.chunking import Chunker, text_to_encode
from indexer.pipeline import ingest_documents
from indexer.sources import check_sources, read_documents
from search_api.cli import main
from storage.collection import Collection, Document
from storage.errors import InvalidInputError
from tests.helpers.data import DATA, read_jsonl, write_jsonl

DOCS = [
    {"_id": "d1", "title": "Paris", "text": "Paris is the capital and largest city of France.", "lang": "en"},
    {"_id": "d2", "title": "", "text": "The mitochondrion is the powerhouse of the cell.", "year": 2020},
    {"_id": "d3", "title": "Rust", "text": "Rust is a systems programming language focused on safety."},
]


@pytest.fixture
def fresh(tmp_path, minilm, settings):
    collection = Collection.create(tmp_path / "data" / "default", minilm.manifest())
    yield collection
    collection.close()


def ingest(collection, encoder, settings, records):
    return ingest_documents(collection, encoder, [_doc(r) for r in records], settings)


def _doc(record):
    return Document(
        record["_id"],
        record.get("title") or None,
        record["text"],
        {k: v for k, v in record.items() if k not in ("_id", "title", "text")},
    )


def test_ingest_then_search_finds_the_document(fresh, minilm, settings):
    report = ingest(fresh, minilm, settings, DOCS)
    assert (report.documents_added, report.passages_written) == (3, 3)
    hit = fresh.search(minilm.encode_queries(["what is the capital of France"]), k=1)[0][0]
    assert (hit.document_id, hit.title, hit.metadata) == ("d1", "Paris", {"lang": "en"})


def test_reingesting_the_same_documents_adds_and_encodes_nothing(fresh, minilm, settings):
    ingest(fresh, minilm, settings, DOCS)
    encoded_before = minilm.stats.texts
    report = ingest(fresh, minilm, settings, DOCS)
    assert report.documents_unchanged == 3
    assert (report.documents_added, report.passages_written, report.passages_removed) == (0, 0, 0)
    assert minilm.stats.texts == encoded_before
    assert fresh.count_passages() == fresh.index_size == 3


def test_a_changed_document_replaces_its_passages(fresh, minilm, settings):
    ingest(fresh, minilm, settings, DOCS)
    changed = [dict(DOCS[0], text="Lyon is a city in France known for its cuisine."), *DOCS[1:]]
    report = ingest(fresh, minilm, settings, changed)
    assert (report.documents_replaced, report.documents_unchanged, report.passages_written) == (1, 2, 1)
    document, passages = fresh.get("d1")
    assert document.text.startswith("Lyon") and [p.text for p in passages] == [document.text]
    assert fresh.count_passages() == fresh.index_size == 3
    hit = fresh.search(minilm.encode_queries(["French cuisine city"]), k=1)[0][0]
    assert hit.text.startswith("Lyon")


def test_a_metadata_change_updates_the_row_without_encoding(fresh, minilm, settings):
    ingest(fresh, minilm, settings, DOCS)
    encoded_before = minilm.stats.texts
    report = ingest(fresh, minilm, settings, [dict(DOCS[0], lang="fr"), *DOCS[1:]])
    assert (report.metadata_updated, report.passages_written) == (1, 0)
    assert minilm.stats.texts == encoded_before
    assert fresh.get("d1")[0].metadata == {"lang": "fr"}


def test_a_restart_finds_the_collection_intact(tmp_path, minilm, settings):
    path = tmp_path / "data" / "default"
    with Collection.create(path, minilm.manifest()) as collection:
        ingest(collection, minilm, settings, DOCS)
        query = minilm.encode_queries(["powerhouse of the cell"])
        before = [(h.passage_id, h.document_id, round(h.score, 5)) for h in collection.search(query, k=3)[0]]
    with Collection.open(path) as reopened:
        after = [(h.passage_id, h.document_id, round(h.score, 5)) for h in reopened.search(query, k=3)[0]]
        assert (reopened.count_documents(), reopened.count_passages(), reopened.index_size) == (3, 3, 3)
    assert after == before


def test_long_documents_split_into_overlapping_token_windows(minilm):
    text = " ".join(f"Sentence number {i} talks about vector search and indexes." for i in range(80))
    chunker = Chunker(minilm.tokenizer, minilm.max_seq_length, overlap=32)
    passages = chunker.split(Document("long", "A title", text))
    assert len(passages) >= 3
    tokens = [len(minilm.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in passages]
    title_tokens = len(minilm.tokenizer("A title ", add_special_tokens=False)["input_ids"])
    assert max(tokens) + title_tokens + 2 <= minilm.max_seq_length  # nothing is truncated by the model
    for first, second in zip(passages, passages[1:]):
        assert second.start < first.end  # overlap
    assert passages[0].start == 0 and passages[-1].end == len(text.rstrip())
    assert all(text[p.start : p.end] == p.text for p in passages)


def test_a_long_title_is_cut_for_encoding_so_title_and_passage_fit_the_window(minilm, fresh, settings):
    """A title takes at most half the window; beyond that it was prepended whole and the model silently cut the
    end of every passage. Now the encoded title is cut on a token boundary (the stored one stays whole)."""
    title = " ".join(f"headline word{i}" for i in range(150))  # about 600 tokens, over twice the window
    text = " ".join(f"Sentence number {i} talks about vector search and indexes." for i in range(80))
    chunker = Chunker(minilm.tokenizer, minilm.max_seq_length, overlap=32)
    [(encoded_title, passages)] = chunker.split_for_encoding([Document("long", title, text)])
    assert len(passages) >= 3 and title.startswith(encoded_title) and len(encoded_title) < len(title)
    lengths = [len(minilm.tokenizer(text_to_encode(encoded_title, p.text))["input_ids"]) for p in passages]
    assert max(lengths) <= minilm.max_seq_length  # special tokens included: nothing left for the model to cut
    assert max(lengths) >= minilm.max_seq_length - 8  # and the window is used, not wasted
    ingest_documents(fresh, minilm, [Document("long", title, text)], settings)
    stored, stored_passages = fresh.get("long")
    assert stored.title == title and [p.text for p in stored_passages] == [p.text for p in passages]


def test_sources_keep_every_other_field_as_metadata(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": 7, "title": "T", "text": "body", "year": 2021, "metadata": {"source": "x"}}],
    )
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("id,title,text,lang\na,Alpha,first text,en\n", encoding="utf-8")
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "one.md").write_text("# Notes\nsome markdown", encoding="utf-8")
    (folder / "two.txt").write_text("plain text", encoding="utf-8")
    (jsonl,) = read_documents(path)
    assert (jsonl.id, jsonl.title, jsonl.metadata) == ("7", "T", {"year": 2021, "source": "x"})
    (row,) = read_documents(csv_path)
    assert (row.id, row.title, row.text, row.metadata) == ("a", "Alpha", "first text", {"lang": "en"})
    assert [d.id for d in read_documents(folder)] == ["sub/one.md", "two.txt"]
    assert check_sources([path, csv_path, folder]).documents == 4


def test_a_record_with_a_title_and_no_text_is_a_document_and_one_with_neither_is_skipped(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"_id": "t1", "title": "Only a title", "text": ""},
            {"_id": "t2", "title": "No text field"},
            {"_id": "t3", "title": "Blank text", "text": "  \n "},
            {"_id": "e1", "title": "", "text": ""},
            {"_id": "e2", "title": "   "},
        ],
    )
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("id,title,text\nc1,A title in a row,\nc2,,\n", encoding="utf-8")
    documents = list(read_documents(path)) + list(read_documents(csv_path))
    assert [(d.id, d.title, d.text) for d in documents] == [
        ("t1", "Only a title", ""),
        ("t2", "No text field", ""),
        ("t3", "Blank text", ""),
        ("c1", "A title in a row", ""),
    ]
    check = check_sources([path, csv_path])
    assert (check.documents, check.skipped) == (4, 3)
    assert check.first_skipped == [
        f"{path} line 4 (document 'e1')",
        f"{path} line 5 (document 'e2')",
        f"{csv_path} line 3 (document 'c2')",
    ]
    with pytest.raises(InvalidInputError, match=r"c.jsonl line 4: document 'e1' has no text"):
        check_sources([path, csv_path], strict=True)


def test_a_title_only_document_is_one_empty_passage_encoded_from_its_whole_title(minilm):
    chunker = Chunker(minilm.chunk_tokenizer, minilm.max_seq_length, overlap=32)
    # over half the window, which a title next to text may not take: with no text it is kept whole
    title = " ".join(f"headline word{i}" for i in range(45))
    title_tokens = len(minilm.tokenizer(title, add_special_tokens=False)["input_ids"])
    assert chunker.window // 2 < title_tokens < chunker.window
    longer = " ".join(f"headline word{i}" for i in range(150))  # over the whole window: cut to fit it
    [(encoded, passages), (encoded_longer, _)] = chunker.split_for_encoding(
        [Document("t", title, ""), Document("t2", longer, "")]
    )
    assert [(p.text, p.start, p.end) for p in passages] == [("", 0, 0)]
    assert encoded == title and text_to_encode(encoded, passages[0].text) == title
    assert longer.startswith(encoded_longer) and len(encoded_longer) < len(longer)
    assert len(minilm.tokenizer(encoded_longer)["input_ids"]) == minilm.max_seq_length


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ingest_good(tmp_path) -> tuple[Path, Path, Path, str]:
    """DOCS ingested by the CLI: (data folder, their file, the collection's database, its digest)."""
    data_dir = tmp_path / "data"
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    first = CliRunner().invoke(main, ["ingest", str(good), "--data-dir", str(data_dir), "--model", "minilm"])
    assert first.exit_code == 0, first.output
    db = data_dir / "default" / "collection.db"
    return data_dir, good, db, _sha(db)


BAD_INPUTS = {
    "empty file": (b"", r"empty.jsonl: no documents found"),
    "not JSON": (
        b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": oops}\n',
        r"bad.jsonl line 2: not JSON",
    ),
    "text not a string": (
        b'{"_id": "a", "text": "fine"}\n{"_id": "b", "title": "T", "text": 5}\n',
        r"bad.jsonl line 2: document 'b' has a non-string text",
    ),
    "only empty records": (b'{"_id": "a", "text": "   "}\n', r"bad.jsonl: no documents found \(its 1 record"),
    "no id": (b'{"text": "orphan"}\n', r"bad.jsonl line 1: record has no id"),
    "not UTF-8": (
        b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "caf\xe9"}\n',
        r"bad.jsonl line 2: not valid UTF-8 \(byte 0xe9",
    ),
    "duplicate id": (b'{"_id": "a", "text": "one"}\n{"_id": "a", "text": "two"}\n', r"'a' appears twice"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_rejected_whole_and_nothing_stored_changes(tmp_path, case):
    data_dir, good, db, before = _ingest_good(tmp_path)
    runner = CliRunner()
    content, message = BAD_INPUTS[case]
    bad = tmp_path / ("empty.jsonl" if case == "empty file" else "bad.jsonl")
    bad.write_bytes(content)
    result = runner.invoke(main, ["ingest", str(good), str(bad), "--data-dir", str(data_dir), "--model", "minilm"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output

    assert re.search(message, result.output), result.output
    assert _sha(db) == before


EMPTY_RECORDS = {
    "no text": b'{"_id": "a", "text": "fine"}\n{"_id": "b"}\n{"_id": "c", "text": "x"}\n',
    "blank text": b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "   "}\n',
    "blank title and text": b'{"_id": "a", "text": "fine"}\n{"_id": "b", "title": " ", "text": ""}\n',
}


@pytest.mark.parametrize("case", EMPTY_RECORDS)
def test_strict_refuses_an_empty_record_whole_and_nothing_stored_changes(tmp_path, case):
    data_dir, good, db, before = _ingest_good(tmp_path)
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(EMPTY_RECORDS[case])
    arguments = ["ingest", str(good), str(bad), "--data-dir", str(data_dir), "--model", "minilm"]
    result = runner.invoke(main, [*arguments, "--strict"])
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert re.search(r"bad.jsonl line 2: document 'b' has no text", result.output), result.output
    assert _sha(db) == before
    result = runner.invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert f"1 records skipped (neither title nor text; --strict refuses them): {bad} line 2 (document 'b')" in (
        result.output
    )


TITLE_ONLY_CORPUS = [
    {"_id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"_id": "photo", "title": "Photosynthesis: how green plants turn sunlight into chemical energy", "text": ""},
    {"_id": "blank", "title": "", "text": ""},
    {"_id": "volcano", "title": "The eruption of Mount Vesuvius that buried Pompeii", "text": "  "},
    {"_id": "nothing"},
    {"_id": "rust", "title": "Rust", "text": "Rust is a systems programming language focused on safety."},
    {"_id": "okapi", "title": "The okapi, a forest giraffe of the Congo"},
    {"_id": "e3", "text": ""},
    {"_id": "e4", "title": None, "text": None},
    {"_id": "e5", "title": "", "text": " "},
    {"_id": "e6", "title": "\t"},
    {"_id": "guitar", "title": "Guitar tunings", "text": "Standard tuning of a six-string guitar is E A D G B E."},
]


def test_title_only_records_are_ingested_searchable_and_unchanged_on_reingest(tmp_path, minilm):
    corpus = write_jsonl(tmp_path / "c.jsonl", TITLE_ONLY_CORPUS)
    data_dir = tmp_path / "data"
    runner = CliRunner()
    arguments = ["ingest", str(corpus), "--data-dir", str(data_dir), "--model", "minilm"]
    result = runner.invoke(main, [*arguments, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert (report["documents_seen"], report["documents_added"], report["passages_written"]) == (6, 6, 6)
    assert report["documents_skipped"] == 6
    assert report["skipped"] == [f"{corpus} line {n} (document {i!r})" for n, i in [(3, "blank"), (5, "nothing")]] + [
        f"{corpus} line {n} (document {i!r})" for n, i in [(8, "e3"), (9, "e4"), (10, "e5")]
    ]
    again = runner.invoke(main, arguments)
    assert again.exit_code == 0, again.output
    assert "6 documents read: 0 added, 0 replaced, 6 unchanged, 0 metadata-only; 0 passages written" in again.output
    assert f"6 records skipped (neither title nor text; --strict refuses them): {corpus} line 3 (document 'blank')" in (
        again.output
    )
    assert again.output.rstrip().endswith(f"{corpus} line 10 (document 'e5') and 1 more")
    with Collection.open(data_dir / "default") as collection:
        document, passages = collection.get("volcano")
        assert (document.title, document.text) == (TITLE_ONLY_CORPUS[3]["title"], "")
        assert [(p.text, p.start, p.end) for p in passages] == [("", 0, 0)]
        for query, expected in [
            ("how do plants make energy from light", "photo"),
            ("ancient Roman city destroyed by a volcano", "volcano"),
            ("forest giraffe", "okapi"),
        ]:
            assert collection.search(minilm.encode_queries([query]), k=1)[0][0].document_id == expected, query
        assert collection.search_lexical("Vesuvius eruption", k=1)[0].document_id == "volcano"
        assert collection.search_lexical("okapi", k=1)[0].document_id == "okapi"
        # the stored vector is the title's alone (int8 passage vectors against fp32: close, not equal)
        title_vector = minilm.encode_passages([TITLE_ONLY_CORPUS[1]["title"]])[0]
        assert float(collection.passage_vectors("photo")[0] @ title_vector) > 0.98


def test_eval_scores_title_only_documents_of_a_beir_folder(tmp_path):
    folder = tmp_path / "classic"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", TITLE_ONLY_CORPUS)
    write_jsonl(
        folder / "queries.jsonl",
        [
            {"_id": "q1", "text": "how do green plants make energy from sunlight"},
            {"_id": "q2", "text": "the eruption that buried Pompeii"},
            {"_id": "q3", "text": "capital of France"},
        ],
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tphoto\t1\nq2\tvolcano\t1\nq3\tparis\t1\n", encoding="utf-8"
    )
    runner = CliRunner()
    for mode in ("dense", "lexical"):
        result = runner.invoke(
            main,
            ["eval", str(folder), "--data-dir", str(tmp_path / "data"), "--model", "minilm", "--mode", mode, "--json"],
        )
        assert result.exit_code == 0, result.output
        scores = json.loads(result.output[result.output.index("{") :])
        assert (scores["queries"], scores["mrr@10"], scores["ndcg@10"]) == (3, 1.0, 1.0), (mode, scores)


@pytest.mark.parametrize(
    "args, into_existing, into_new",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'", "unknown model 'no-such-model'"),
        (["--model", "minilm", "--dim", "1024"], "refusing dim 1024", "--dim 1024 is not available"),
        (["--model", "minilm", "--dim", "128"], "refusing dim 128", None),
    ],
)
def test_bad_options_are_clear_errors_and_change_nothing(tmp_path, args, into_existing, into_new):
    data_dir, good, db, before = _ingest_good(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(good), "--data-dir", str(data_dir), *args])
    assert result.exit_code == 2 and into_existing in result.output, result.output
    assert _sha(db) == before
    if into_new:
        result = runner.invoke(main, ["ingest", str(good), "--data-dir", str(tmp_path / "new"), *args])
        assert result.exit_code == 2 and into_new in result.output, result.output
        assert not (tmp_path / "new" / "default").exists()


def test_cli_ingest_search_info_round_trip(tmp_path):
    data_dir = tmp_path / "data"
    corpus = write_jsonl(tmp_path / "c.jsonl", read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=60))
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(corpus), "--data-dir", str(data_dir), "--model", "minilm", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["documents_added"] == 60 and report["collection"]["documents"] == 60
    result = runner.invoke(
        main, ["search", "fictional airline in Lost", "--data-dir", str(data_dir), "-k", "3", "--json"]
    )
    hits = json.loads(result.output[result.output.index("{") :])["results"]
    assert hits[0]["id"] == "<dbpedia:Oceanic_Airlines>" and hits[0]["title"] == "Oceanic Airlines"
    other_dim = runner.invoke(main, ["search", "airline", "--data-dir", str(data_dir), "--dim", "128"])
    assert other_dim.exit_code == 2 and "refusing dim 128" in other_dim.output, other_dim.output
    info = json.loads(runner.invoke(main, ["info", "--data-dir", str(data_dir)]).output)
    assert info[0]["documents"] == 60 and info[0]["model"] == "minilm" and info[0]["dim"] == 384


def test_pipelined_batches_commit_in_order_and_see_the_batch_before(fresh, minilm, settings):
    """Batch k+1 is classified and chunked while batch k encodes; a document repeated across them is still
    classified against what batch k wrote, and the later version wins."""
    records = [
        {"_id": "a", "text": "The first version of document a, about rivers."},
        {"_id": "b", "text": "Document b is about mountains."},
        {"_id": "a", "text": "The second version of document a, about deserts."},
        {"_id": "c", "text": "Document c is about oceans."},
        {"_id": "b", "text": "Document b is about mountains."},  # unchanged against batch 1's commit
        {"_id": "d", "text": "Document d is about forests."},
    ]
    report = ingest_documents(fresh, minilm, [_doc(r) for r in records], settings, batch_documents=2)
    assert (report.documents_added, report.documents_replaced, report.documents_unchanged) == (4, 1, 1)
    assert fresh.count_documents() == 4
    assert fresh.index_size == fresh.count_passages() == 4
    top = fresh.search(minilm.encode_queries(["deserts"]), 1)[0][0]
    assert (top.document_id, top.text) == ("a", records[2]["text"])


@pytest.mark.parametrize("model", ["minilm", "tiny-stella"])
def test_chunking_in_rust_cuts_what_transformers_offsets_cut(model, minilm, tiny_stella, settings):
    """The ingest's chunker asks the Rust tokenizer directly; it cuts exactly the passages that transformers'
    offset mappings, document by document, cut (WordPiece for MiniLM, byte-level BPE for the Qwen2 tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = minilm.chunk_tokenizer if model == "minilm" else AutoTokenizer.from_pretrained(str(tiny_stella))
    docs = [_doc(r) for r in read_jsonl(DATA / "scifact" / "corpus.jsonl", limit=60)]
    docs += [
        Document("untitled", None, docs[0].text),
        Document("long-title", "word " * 400, docs[1].text),
        Document("unicode", "Ünïcödé", "Naïve café — 東京 " * 60),
    ]
    window = 128
    chunker = Chunker(tokenizer, window, settings.ingest.chunk_overlap)
    assert chunker._rust is not None
    many = chunker.split_many(docs)
    reference = Chunker(tokenizer, window, settings.ingest.chunk_overlap)
    reference._rust = None  # transformers' tokenizer call, offsets as Python lists
    assert many == [reference.split(d) for d in docs]
    assert sum(len(p) > 1 for p in many) >= 5  # long abstracts really are cut into windows
