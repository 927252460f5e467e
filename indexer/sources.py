"""Reading documents from files: BEIR-style JSONL, CSV, and folders of ``.txt``/``.md`` files.

Every bad record is an :class:`InvalidInputError` naming the file and line. :func:`check_sources` reads all
inputs once before anything is written, so a bad line rejects the whole ingest and nothing stored changes.

A record with a title and no text is a document (encoded from its title, stored with text ``""``), as BEIR's
loader takes it; one with neither is an :class:`EmptyRecord`: skipped and counted, or refused under ``strict``.

>>> docs = list(read_documents(Path("corpus.jsonl")))
>>> docs[0].id, sorted(docs[0].metadata)
('4983', [])
>>> check_sources([Path("corpus.jsonl")]).skipped
0
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from storage.collection import Document, metadata_to_json
from storage.errors import InvalidInputError
from storage.inputs import MetadataLimits, lone_surrogate

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv", ".tsv"}
ID_KEYS = ("_id", "id")
NAMED_SKIPS = 5  # empty records named in an ingest summary; the rest are only counted
DEFAULT_LIMITS = MetadataLimits()  # the default settings' ingest.max_metadata_depth and max_metadata_bytes


@dataclass(frozen=True)
class EmptyRecord:
    """A record with an id but neither title nor text: nothing to encode."""

    where: str
    document_id: str

    def __str__(self) -> str:
        return f"{self.where} (document {self.document_id!r})"

    def refusal(self) -> InvalidInputError:
        """The error that rejects the whole ingest under ``strict``."""
        return InvalidInputError(
            f"{self.where}: document {self.document_id!r} has no text (a non-empty 'text' or 'title' field is "
            "required; without --strict such records are skipped)"
        )


@dataclass
class SourceCheck:
    """What :func:`check_sources` found: the documents to ingest and the empty records it skips."""

    documents: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def _document(record: dict, where: str, limits: MetadataLimits) -> Document | EmptyRecord:
    doc_id = next((record[k] for k in ID_KEYS if record.get(k) not in (None, "")), None)
    if doc_id is None:
        raise InvalidInputError(f"{where}: record has no id (expected an '_id' or 'id' field)")
    if not isinstance(doc_id, (str, int)):
        raise InvalidInputError(f"{where}: id must be a string or integer, got {type(doc_id).__name__}")
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidInputError(f"{where}: document {doc_id!r} has a non-string text")
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
    if problem := lone_surrogate({"id": doc_id, "title": title, "text": text}, "record"):
        raise InvalidInputError(f"{where}: {problem}; the file must hold valid Unicode")
    try:
        # checked here, so a bad record rejects the ingest before any write
        metadata_to_json(str(doc_id), metadata, limits)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    text = text if text and text.strip() else ""
    if not text and not (title and title.strip()):
        return EmptyRecord(where, str(doc_id))
    return Document(str(doc_id), title or None, text, metadata)


def _read_jsonl(path: Path, limits: MetadataLimits) -> Iterator[Document | EmptyRecord]:
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
            yield _document(record, where, limits)


def _read_csv(path: Path, limits: MetadataLimits) -> Iterator[Document | EmptyRecord]:
    raw = path.read_bytes()
    text = _decode_whole(raw, path)
    dialect = "excel-tab" if path.suffix == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    if not reader.fieldnames or "text" not in reader.fieldnames:
        raise InvalidInputError(f"{path} line 1: the header must name a 'text' column (found {reader.fieldnames})")
    for record in reader:
        yield _document(dict(record), f"{path} line {reader.line_num}", limits)


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
        if problem := lone_surrogate(rel, "file name"):  # bytes that are not UTF-8 in a file's name
            raise InvalidInputError(f"{path}: {problem}; rename the file (its path is the document id)")
        text = _decode_whole(path.read_bytes(), path)
        if not text.strip():
            raise InvalidInputError(f"{path}: file is empty; remove it or give it text")
        yield Document(rel, None, text, {"path": rel, "format": path.suffix.lower().lstrip(".")})


def read_documents(path: Path, limits: MetadataLimits = DEFAULT_LIMITS) -> Iterator[Document]:
    """Documents from one file or folder, validated record by record (metadata within ``limits``); empty records
    are left out."""
    return (record for record in read_records(path, limits) if isinstance(record, Document))


def read_records(path: Path, limits: MetadataLimits = DEFAULT_LIMITS) -> Iterator[Document | EmptyRecord]:
    """The records of one file or folder in order: documents, and the empty records :func:`check_sources` counts.

    >>> [type(r).__name__ for r in read_records(Path("corpus.jsonl"))][:2]
    ['Document', 'EmptyRecord']
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, limits)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, limits)
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


def check_sources(paths: Sequence[Path], strict: bool = False, limits: MetadataLimits = DEFAULT_LIMITS) -> SourceCheck:
    """Read every input once, raising on the first bad record (metadata beyond ``limits`` included) or repeated id;
    count the documents and the empty records (neither title nor text), which ``strict`` refuses like a bad record.

    >>> check_sources([Path("corpus.jsonl")]).documents
    5183
    """
    seen: dict[str, str] = {}
    check = SourceCheck()
    for path in paths:
        file_count = file_skipped = 0
        for record in read_records(Path(path), limits):
            if isinstance(record, EmptyRecord):
                if strict:
                    raise record.refusal()
                file_skipped += 1
                if len(check.first_skipped) < NAMED_SKIPS:
                    check.first_skipped.append(str(record))
                continue
            if record.id in seen:
                raise InvalidInputError(f"{path}: document id {record.id!r} appears twice (first in {seen[record.id]})")
            seen[record.id] = str(path)
            file_count += 1
        if file_count == 0:
            detail = (
                f"its {file_skipped} record(s) have neither title nor text"
                if file_skipped
                else "the file or folder is empty"
            )
            raise InvalidInputError(f"{path}: no documents found ({detail})")
        check.documents += file_count
        check.skipped += file_skipped
    return check
