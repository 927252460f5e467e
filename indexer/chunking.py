"""Splitting documents into passages that fit the model, measured in the model's own tokens.

A passage is at most ``max_tokens`` tokens of text (the budget left after special tokens, the passage prompt
and the title, which is prepended when encoding), with ``overlap`` tokens shared between neighbours.
Passages keep their character offsets into the document text, so ``text[start:end]`` is the passage.

>>> chunker = Chunker(tokenizer, max_seq_length=256, overlap=32)
>>> [p.ordinal for p in chunker.split(Document("d1", None, "A short text."))]
[0]
"""

from __future__ import annotations

from storage.collection import Document, Passage

MIN_BUDGET_FRACTION = 0.5  # a long title never squeezes the passage below half the window


class Chunker:
    def __init__(self, tokenizer, max_seq_length: int, overlap: int = 32, passage_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        with_special = len(tokenizer("x")["input_ids"])
        without = len(tokenizer("x", add_special_tokens=False)["input_ids"])
        reserved = with_special - without
        if passage_prompt:
            reserved += len(tokenizer(passage_prompt, add_special_tokens=False)["input_ids"])
        self.window = max(8, max_seq_length - reserved)
        self.overlap = min(overlap, self.window // 4)

    def _budget(self, title: str | None) -> int:
        if not title:
            return self.window
        return self._budget_for(len(self.tokenizer(title + " ", add_special_tokens=False)["input_ids"]))

    def _budget_for(self, title_tokens: int) -> int:
        return max(int(self.window * MIN_BUDGET_FRACTION), self.window - title_tokens)

    def split(self, doc: Document) -> list[Passage]:
        """The passages of ``doc``: one when it fits, else overlapping windows on token boundaries."""
        encoding = self.tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        return self._windows(doc, encoding["offset_mapping"], self._budget(doc.title))

    def split_many(self, docs: list[Document]) -> list[list[Passage]]:
        """:meth:`split` of each document, their texts (and titles) tokenised in one batch call: the fast
        tokenizer encodes a batch in Rust without a Python round trip per document (msmarco ingest: 0.45 s of
        tokenizer calls per 1,500 documents one by one)."""
        if not docs:
            return []
        offsets = self.tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        titled = [d.title + " " for d in docs if d.title]
        title_ids = iter(self.tokenizer(titled, add_special_tokens=False)["input_ids"] if titled else [])
        return [
            self._windows(doc, doc_offsets, self._budget_for(len(next(title_ids))) if doc.title else self.window)
            for doc, doc_offsets in zip(docs, offsets)
        ]

    def _windows(self, doc: Document, offset_mapping, budget: int) -> list[Passage]:
        offsets = [o for o in offset_mapping if o[1] > o[0]]
        if len(offsets) <= budget:
            return [Passage(doc.id, 0, doc.text, 0, len(doc.text))]
        passages = []
        step = budget - self.overlap
        for ordinal, first in enumerate(range(0, len(offsets), step)):
            window = offsets[first : first + budget]
            start, end = window[0][0], window[-1][1]
            passages.append(Passage(doc.id, ordinal, doc.text[start:end], start, end))
            if first + budget >= len(offsets):
                break
        return passages


def text_to_encode(title: str | None, passage_text: str) -> str:
    """What the model sees for a passage: ``title + " " + passage`` when a title exists."""
    return f"{title} {passage_text}" if title else passage_text
