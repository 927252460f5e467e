"""A clone is all the project needs: no file points at data beside the repository, and the carried data is there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from indexer.evaluation import BeirDataset
from tests.helpers.data import DATA, ROOT

# A folder next to the repository (up one level, by a relative path, ``ROOT.parent`` or ``parents[2]``) is one a
# user's clone does not have.
OUTSIDE_PATH = re.compile(r"\.\./shared\b|/shared/data\b|parents?(\[\d+\])?\s*/\s*[\"']shared[\"']")


def project_files() -> list[Path]:
    """Every file git tracks or would track (untracked but not ignored), relative to the repository root."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [Path(name) for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_no_file_names_a_folder_beside_the_repository():
    this_file = Path(__file__).resolve().relative_to(ROOT)  # it spells the pattern out
    offenders = []
    for name in project_files():
        if name == this_file:
            continue
        text = (ROOT / name).read_bytes().decode("utf-8", errors="replace")
        offenders += [
            f"{name}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE_PATH.search(line)
        ]
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_the_pattern_catches_each_spelling():
    up = "../" + "shared"  # spelt apart so that this file does not name the folder itself
    spellings = [
        f"stella-search eval {up}/data/msmarco",
        'SHARED_DATA = ROOT.parent / "shared" / "data"',
        "SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'",
        f'cp "$root/{up}/data/$corpus/queries.jsonl"',
    ]
    assert all(OUTSIDE_PATH.search(spelling) for spelling in spellings)
    assert not OUTSIDE_PATH.search("sharded collections share one encoder; tests/data/msmarco")


def test_the_carried_data_sets_are_inside_the_repository_and_complete():
    assert DATA.resolve().is_relative_to(ROOT)
    tracked = set(map(str, project_files()))
    for name, documents, queries in [("msmarco", 5000, 43), ("dbpedia", 5000, 40), ("scifact", 5183, 300)]:
        folder = DATA / name
        for part in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "SOURCE.md"):
            assert str((folder / part).relative_to(ROOT)) in tracked, f"{name}/{part} is not in the repository"
        dataset = BeirDataset.load(folder)
        assert sum(1 for line in open(dataset.corpus, encoding="utf-8") if line.strip()) == documents
        assert len(dataset.qrels) == queries
        assert set(dataset.qrels) <= set(dataset.queries)
    assert (DATA / "SOURCE.md").is_file()
