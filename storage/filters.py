"""Metadata filters, Mongo-style, compiled to parameterised SQL over ``documents.metadata`` (JSON).

Operators: ``$eq $ne $in $nin $gt $gte $lt $lte $exists $and $or``; a bare value means ``$eq``; several keys in
one object are ANDed. ``$eq``/``$in`` also match a value inside a list (``{"tags": "road"}`` matches
``{"tags": ["road", "rail"]}``). Range operators compare numbers with numbers and strings with strings only.
User keys and values only ever reach SQLite as bound parameters; keys must be plain names.

>>> compile_filter({"year": {"$gte": 2020}, "lang": {"$in": ["en", "de"]}})[1]
['$."year"', 'integer', 'real', '$."year"', 2020, '$."lang"', '$."lang"', 'en', 'de']
"""

from __future__ import annotations

import re
from typing import Any

from storage.errors import InvalidInputError
from storage.inputs import lone_surrogate

KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # used with fullmatch
MAX_DEPTH = 8
MAX_CLAUSES = 128
MAX_LIST = 1000
MAX_PARAMS = 5000  # well under SQLite's bound-parameter limit
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what SQLite binds as an integer
COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
FIELD_OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", *COMPARE}
Scalar = (str, int, float, bool, type(None))


class _Compiler:
    def __init__(self, indexed: frozenset[str] = frozenset()) -> None:
        self.params: list[Any] = []
        self.clauses = 0
        self.indexed = indexed

    def _count(self) -> None:
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise InvalidInputError(f"filter has more than {MAX_CLAUSES} conditions; simplify it")

    def node(self, node: Any, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise InvalidInputError(f"filter is nested more than {MAX_DEPTH} levels deep")
        if not isinstance(node, dict) or not node:
            raise InvalidInputError('a filter must be a non-empty object, e.g. {"year": {"$gte": 2020}}')
        parts = []
        for key, value in node.items():
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise InvalidInputError(f"{key} takes a non-empty list of filters")
                joined = f" {key[1:].upper()} ".join(self.node(v, depth + 1) for v in value)
                parts.append(f"({joined})")
            elif key.startswith("$"):
                raise InvalidInputError(
                    f"unknown operator {key!r} at the top of a filter; use $and, $or or a metadata field name"
                )
            else:
                parts.append(self.field(key, value, depth))
        return " AND ".join(parts) if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def field(self, key: str, condition: Any, depth: int) -> str:
        if not KEY.fullmatch(key):
            raise InvalidInputError(
                f"invalid metadata field name {key!r} in filter: use letters, digits, '_' and '-' (at most 64)"
            )
        path = f'$."{key}"'
        if not isinstance(condition, dict):
            condition = {"$eq": condition}
        if not condition:
            raise InvalidInputError(f"the condition on {key!r} is empty")
        parts = []
        for op, value in condition.items():
            self._count()
            if op not in FIELD_OPERATORS:
                raise InvalidInputError(
                    f"unknown operator {op!r} on {key!r}; use one of {', '.join(sorted(FIELD_OPERATORS))}"
                )
            if key in self.indexed and op in ("$eq", "$in", *COMPARE) and value is not None:
                parts.append(self.indexed_operator(key, op, value))
            else:
                parts.append(self.operator(path, key, op, value))
        return " AND ".join(parts) if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def indexed_operator(self, key: str, op: str, value: Any) -> str:
        """The same test through ``metadata_index`` (one row per scalar value, or per element of a list)."""
        lookup = "documents.id IN (SELECT document_id FROM metadata_index WHERE field = ? AND "
        if op in ("$eq", "$in"):
            values = [value] if op == "$eq" else value
            if op == "$in" and (not isinstance(value, list) or not value or len(value) > MAX_LIST):
                raise InvalidInputError(f"$in on {key!r} takes a non-empty list of at most {MAX_LIST} values")
            values = [self._scalar(key, op, v) for v in values]
            self.params.extend([key, *values])
            return lookup + f"value IN ({','.join('?' * len(values))}))"
        value = self._scalar(key, op, value)
        if isinstance(value, bool):
            raise InvalidInputError(f"{op} on {key!r} compares numbers or strings, not {value!r}")
        types = ("integer", "real") if isinstance(value, (int, float)) else ("text", "text")
        self.params.extend([key, *types, value])
        # ranges never look inside lists, as on the unindexed path
        return lookup + f"from_list = 0 AND kind IN (?, ?) AND value {COMPARE[op]} ?)"

    def _scalar(self, key: str, op: str, value: Any) -> Any:
        if not isinstance(value, Scalar):
            raise InvalidInputError(
                f"{op} on {key!r} takes a string, number, boolean or null, not {type(value).__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            # SQLite's JSON functions read such a number in stored metadata as a real, so compare with one
            try:
                return float(value)
            except OverflowError:
                raise InvalidInputError(f"{op} on {key!r}: the number {str(value)[:20]}... is too large") from None
        return value

    def _members(self, path: str, values: list) -> str:
        """True when the field equals one of ``values`` or is a list holding one of them (never an object)."""
        self.params.extend([path, path])
        self.params.extend(values)
        marks = ",".join("?" * len(values))
        return (
            "(json_type(documents.metadata, ?) != 'object' AND EXISTS (SELECT 1 FROM json_each(documents.metadata, ?)"
            f" WHERE json_each.value IN ({marks})))"
        )

    def operator(self, path: str, key: str, op: str, value: Any) -> str:
        if op in ("$eq", "$ne"):
            value = self._scalar(key, op, value)
            if value is None:
                self.params.append(path)
                test = "json_type(documents.metadata, ?) = 'null'"
            else:
                test = self._members(path, [value])
            return test if op == "$eq" else f"NOT ({test})"
        if op in ("$in", "$nin"):
            if not isinstance(value, list) or not value or len(value) > MAX_LIST:
                raise InvalidInputError(f"{op} on {key!r} takes a non-empty list of at most {MAX_LIST} values")
            values = [self._scalar(key, op, v) for v in value]
            test = self._members(path, values)
            return test if op == "$in" else f"NOT ({test})"
        if op == "$exists":
            if not isinstance(value, bool):
                raise InvalidInputError(f"$exists on {key!r} takes true or false")
            self.params.append(path)
            return f"json_type(documents.metadata, ?) IS {'NOT ' if value else ''}NULL"
        value = self._scalar(key, op, value)
        if isinstance(value, bool) or value is None:
            raise InvalidInputError(f"{op} on {key!r} compares numbers or strings, not {value!r}")
        types = ("integer", "real") if isinstance(value, (int, float)) else ("text", "text")
        self.params.extend([path, *types, path, value])
        return f"(json_type(documents.metadata, ?) IN (?, ?) AND json_extract(documents.metadata, ?) {COMPARE[op]} ?)"


def compile_filter(filter_: dict, indexed: frozenset[str] = frozenset()) -> tuple[str, list[Any]]:
    """``(sql, params)``: a boolean SQL expression over the ``documents`` row, and its bound parameters.

    Fields in ``indexed`` (see ``Collection.index_field``) are looked up in ``metadata_index`` instead.
    """
    if problem := lone_surrogate(filter_, "filter"):  # SQLite could not bind it
        raise InvalidInputError(f"{problem}; send valid Unicode")
    compiler = _Compiler(indexed)
    sql = compiler.node(filter_, depth=1)
    if len(compiler.params) > MAX_PARAMS:
        raise InvalidInputError(
            f"filter is too large ({len(compiler.params)} values; at most {MAX_PARAMS}): simplify it"
        )
    return sql, compiler.params
