"""Splitting documents into passages that fit the model, measured in the model's own tokens.

A passage is at most ``max_tokens`` tokens of text (the budget left after special tokens, the passage prompt
and the title, which is prepended when encoding), with ``overlap`` tokens shared between neighbours.
Passages keep their character offsets into the document text, so ``text[start:end]`` is the passage. A
title-only document (text ``""``) is one empty passage, encoded from its title alone.

>>> chunker = Chunker(tokenizer, max_seq_length=256, overlap=32)
>>> [p.ordinal for p in chunker.split(Document("d1", None, "A short text."))]
[0]
"""

from __future__ import annotations

import threading
import weakref

from storage.collection import Document, Passage

MIN_BUDGET_FRACTION = 0.5  # a long title never squeezes the passage below half the window

_RUST_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUST_COPIES_LOCK = threading.Lock()


def _rust_copy(tokenizer):
    """A fast tokenizer's Rust core, copied once per tokenizer (a server makes a Chunker per upsert; copying
    MiniLM's takes 15 ms, Stella's 151k vocabulary more), set to no padding and no truncation and never changed
    after: the model's own settings stay out of reach of other threads, and asking it directly skips
    transformers' conversion of every encoding (ids, masks, offsets) into Python lists. None for a slow
    tokenizer, or one whose core cannot be serialised (a custom Python pre-tokenizer): transformers' call then."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    with _RUST_COPIES_LOCK:
        if tokenizer in _RUST_COPIES:
            return _RUST_COPIES[tokenizer]
        from tokenizers import Tokenizer

        try:
            copy = Tokenizer.from_str(backend.to_str())
        except Exception:  # tokenizers raises plain Exceptions for what it cannot serialise
            copy = None
        else:
            copy.no_truncation()
            copy.no_padding()
        _RUST_COPIES[tokenizer] = copy
        return copy


class Chunker:
    def __init__(self, tokenizer, max_seq_length: int, overlap: int = 32, passage_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._rust = _rust_copy(tokenizer)
        with_special = len(tokenizer("x")["input_ids"])
        without = len(tokenizer("x", add_special_tokens=False)["input_ids"])
        reserved = with_special - without
        if passage_prompt:
            reserved += len(tokenizer(passage_prompt, add_special_tokens=False)["input_ids"])
        self.window = max(8, max_seq_length - reserved)
        self.overlap = min(overlap, self.window // 4)

    def split(self, doc: Document) -> list[Passage]:
        """The passages of ``doc``: one when it fits, else overlapping windows on token boundaries."""
        return self.split_many([doc])[0]

    def split_many(self, docs: list[Document]) -> list[list[Passage]]:
        """:meth:`split` of each document (see :meth:`split_for_encoding`)."""
        return [passages for _, passages in self.split_for_encoding(docs)]

    def split_for_encoding(self, docs: list[Document]) -> list[tuple[str | None, list[Passage]]]:
        """Per document, the title to encode with each of its passages (``text_to_encode(title, passage.text)``)
        and its passages. A title of more than half the window is cut there, on a token boundary, for encoding
        only (the stored title stays whole), so title and passage always fit the model's window; a document
        without text leaves its title the whole window.

        Texts and titles are tokenised in one batch call each: the fast tokenizer encodes a batch in Rust without a
        Python round trip per document (msmarco ingest: 0.45 s of tokenizer calls per 1,500 documents one by
        one). Token offsets cross into Python only for the documents longer than their budget, and the titles
        longer than theirs."""
        if not docs:
            return []
        title_lengths, title_offsets = self._lengths_and_offsets([d.title + " " for d in docs if d.title])
        titles = iter(zip(title_lengths, title_offsets))
        lengths, offsets = self._lengths_and_offsets([d.text for d in docs])
        out = []
        for doc, length, doc_offsets in zip(docs, lengths, offsets):
            title, budget = doc.title, self.window
            if title:
                title_length, offsets_of_title = next(titles)
                floor = int(self.window * MIN_BUDGET_FRACTION) if length else 0
                budget = max(floor, self.window - title_length)
                if title_length > self.window - budget:
                    title = title[: offsets_of_title()[self.window - budget - 1][1]].rstrip()
            # a document of at most `budget` tokens is one passage whatever its offsets say
            out.append((title, self._windows(doc, doc_offsets(), budget) if length > budget else [_whole(doc)]))
        return out

    def _lengths_and_offsets(self, texts: list[str]) -> tuple[list[int], list]:
        """Token counts of ``texts`` (no special tokens) and, per text, a callable returning its offsets."""
        if not texts:
            return [], []
        if self._rust is not None:
            encodings = self._rust.encode_batch(texts, add_special_tokens=False)
            return [len(e) for e in encodings], [lambda e=e: e.offsets for e in encodings]
        mapping = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [len(m) for m in mapping], [lambda m=m: m for m in mapping]

    def _windows(self, doc: Document, offset_mapping, budget: int) -> list[Passage]:
        offsets = [o for o in offset_mapping if o[1] > o[0]]
        if len(offsets) <= budget:
            return [_whole(doc)]
        passages = []
        step = budget - self.overlap
        for ordinal, first in enumerate(range(0, len(offsets), step)):
            window = offsets[first : first + budget]
            start, end = window[0][0], window[-1][1]
            passages.append(Passage(doc.id, ordinal, doc.text[start:end], start, end))
            if first + budget >= len(offsets):
                break
        return passages


def _whole(doc: Document) -> Passage:
    return Passage(doc.id, 0, doc.text, 0, len(doc.text))


def text_to_encode(title: str | None, passage_text: str) -> str:
    """What the model sees for a passage: ``title + " " + passage`` when a title exists, the title alone for
    the empty passage of a title-only document.

    >>> text_to_encode("Faiss", "A library for vector search."), text_to_encode("Faiss", "")
    ('Faiss A library for vector search.', 'Faiss')
    """
    if not title:
        return passage_text
    return f"{title} {passage_text}" if passage_text else title
