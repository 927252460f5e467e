"""Retrieval quality on a BEIR-layout dataset (corpus.jsonl, queries.jsonl, qrels/test.tsv), scored by pytrec_eval.

Documents are ranked by their best passage. Metrics: nDCG@10, recall@100 and MRR@10, averaged over every query
that has judgements (a query with no results counts as 0).

>>> dataset = BeirDataset.load(Path("tests/data/msmarco"))
>>> evaluate(dataset, run)["ndcg@10"]
0.7977
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytrec_eval

from storage.errors import InvalidInputError

# queries -> per query a ranked list of (document id, score)
SearchFn = Callable[[list[str], int], list[list[tuple[str, float]]]]


@dataclass
class BeirDataset:
    name: str
    corpus: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, directory: Path, split: str = "test") -> BeirDataset:
        directory = Path(directory)
        corpus, queries_file, qrels_file = (
            directory / "corpus.jsonl",
            directory / "queries.jsonl",
            directory / "qrels" / f"{split}.tsv",
        )
        for required in (corpus, queries_file, qrels_file):
            if not required.exists():
                raise InvalidInputError(
                    f"{directory} is not a BEIR dataset folder: {required.relative_to(directory)} is missing"
                )
        try:
            qrels = _read_qrels(qrels_file)
            queries = _read_queries(queries_file, qrels)
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{directory}: a file is not UTF-8 text ({exc})") from None
        return cls(directory.name, corpus, queries, qrels)


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if number == 1 and row and row[0] == "query-id":
                continue
            if len(row) != 3 or not row[2].strip().lstrip("-").isdigit():
                raise InvalidInputError(f"{path} line {number}: expected query-id, corpus-id and an integer score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def _read_queries(path: Path, qrels: dict) -> dict[str, str]:
    """The texts of the judged queries."""
    queries = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                query_id, text = str(record["_id"]), record["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInputError(
                    f"{path} line {number}: expected a JSON object with '_id' and 'text' ({exc})"
                ) from None
            if query_id in qrels:
                queries[query_id] = text
    return queries


def run_queries(dataset: BeirDataset, search: SearchFn, k: int = 100, batch: int = 64) -> dict[str, dict[str, float]]:
    """The run ``{query id: {document id: score}}`` of the top-k documents per query."""
    ids = list(dataset.queries)
    run: dict[str, dict[str, float]] = {}
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        for qid, ranked in zip(chunk, search([dataset.queries[q] for q in chunk], k)):
            run[qid] = {doc_id: float(score) for doc_id, score in ranked}
    return run


def evaluate(dataset: BeirDataset, run: dict[str, dict[str, float]]) -> dict:
    """nDCG@10, recall@100 and MRR@10 of ``run`` against the dataset's qrels."""
    qrels = {q: judged for q, judged in dataset.qrels.items() if q in dataset.queries}
    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)

    def mean(table: dict, measure: str) -> float:
        return sum(table.get(q, {}).get(measure, 0.0) for q in qrels) / len(qrels)

    return {
        "dataset": dataset.name,
        "queries": len(qrels),
        "ndcg@10": round(mean(full, "ndcg_cut_10"), 4),
        "recall@100": round(mean(full, "recall_100"), 4),
        "mrr@10": round(mean(mrr, "recip_rank"), 4),
    }
