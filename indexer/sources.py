"""Reading documents from files: BEIR-style JSONL, CSV, and folders of ``.txt``/``.md`` files.

Every bad record is an :class:`InvalidInputError` naming the file and line. :func:`check_sources` reads all
inputs once before anything is written, so a bad line rejects the whole ingest and nothing stored changes.

>>> docs = list(read_documents(Path("corpus.jsonl")))
>>> docs[0].id, sorted(docs[0].metadata)
('4983', [])
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from storage.collection import Document, metadata_to_json
from storage.errors import InvalidInputError

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv", ".tsv"}
ID_KEYS = ("_id", "id")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def _document(record: dict, where: str) -> Document:
    doc_id = next((record[k] for k in ID_KEYS if record.get(k) not in (None, "")), None)
    if doc_id is None:
        raise InvalidInputError(f"{where}: record has no id (expected an '_id' or 'id' field)")
    if not isinstance(doc_id, (str, int)):
        raise InvalidInputError(f"{where}: id must be a string or integer, got {type(doc_id).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{where}: document {doc_id!r} has no text (a non-empty 'text' field is required)")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise InvalidInputError(f"{where}: document {doc_id!r} has a non-string title")
    metadata = {k: v for k, v in record.items() if k not in (*ID_KEYS, "text", "title", "metadata")}
    nested = record.get("metadata")
    if isinstance(nested, dict):
        metadata = {**nested, **metadata}
    elif nested not in (None, "", {}):
        metadata["metadata"] = nested
    if None in metadata:  # csv.DictReader puts the fields of a row longer than its header under None
        raise InvalidInputError(f"{where}: the row has more fields than the header")
    try:
        metadata_to_json(str(doc_id), metadata)  # checked here, so a bad record rejects the ingest before any write
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    return Document(str(doc_id), title or None, text, metadata)


def _read_jsonl(path: Path) -> Iterator[Document]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InvalidInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield _document(record, where)


def _read_csv(path: Path) -> Iterator[Document]:
    raw = path.read_bytes()
    text = _decode_whole(raw, path)
    dialect = "excel-tab" if path.suffix == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    if not reader.fieldnames or "text" not in reader.fieldnames:
        raise InvalidInputError(f"{path} line 1: the header must name a 'text' column (found {reader.fieldnames})")
    for record in reader:
        yield _document(dict(record), f"{path} line {reader.line_num}")


def _decode_whole(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInputError(
            f"{path} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8"
        ) from None


def _read_folder(root: Path) -> Iterator[Document]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        text = _decode_whole(path.read_bytes(), path)
        if not text.strip():
            raise InvalidInputError(f"{path}: file is empty; remove it or give it text")
        yield Document(rel, None, text, {"path": rel, "format": path.suffix.lower().lstrip(".")})


def read_documents(path: Path) -> Iterator[Document]:
    """Documents from one file or folder, validated record by record."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    if suffix in TEXT_SUFFIXES:
        return _read_folder_file(path)
    raise InvalidInputError(
        f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl (BEIR), .csv/.tsv, .txt/.md or a folder"
    )


def _read_folder_file(path: Path) -> Iterator[Document]:
    text = _decode_whole(path.read_bytes(), path)
    if not text.strip():
        raise InvalidInputError(f"{path}: file is empty")
    yield Document(path.name, None, text, {"path": path.name, "format": path.suffix.lower().lstrip(".")})


def check_sources(paths: Sequence[Path]) -> int:
    """Read every input once, raising on the first bad record or repeated id; returns the document count."""
    seen: dict[str, str] = {}
    count = 0
    for path in paths:
        file_count = 0
        for doc in read_documents(Path(path)):
            if doc.id in seen:
                raise InvalidInputError(f"{path}: document id {doc.id!r} appears twice (first in {seen[doc.id]})")
            seen[doc.id] = str(path)
            file_count += 1
        if file_count == 0:
            raise InvalidInputError(f"{path}: no documents found (the file or folder is empty)")
        count += file_count
    return count
