"""Checks on values from outside (request bodies, files, command-line arguments) before they are stored or searched.

Both walk JSON-like values (strings, lists, dicts) with an explicit stack, so a value nested thousands of levels
deep is measured, never a ``RecursionError``.

>>> lone_surrogate({"tags": ["ok", "bad \\ud800"]}, "metadata")
'metadata.tags[1]: a lone UTF-16 surrogate (\\\\ud800) at character 5'
>>> json_depth({"a": {"b": [1]}})
3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Deepest metadata a read returns as it is stored (storage.collection.stored_metadata), and so the most a limit may
# allow: responses are serialised by pydantic, which refuses values nested more than about 255 levels.
READABLE_METADATA_DEPTH = 64
DEFAULT_METADATA_DEPTH = 32
DEFAULT_METADATA_BYTES = 64 * 1024


@dataclass(frozen=True)
class MetadataLimits:
    """How deep (lists and objects) and how large (bytes of its stored JSON) a new document's metadata may be.

    >>> MetadataLimits(depth=32, bytes=65536)
    MetadataLimits(depth=32, bytes=65536)
    """

    depth: int = DEFAULT_METADATA_DEPTH
    bytes: int = DEFAULT_METADATA_BYTES


def _surrogate_in(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # the message shows the escape, never the character: it has no UTF-8 form to be sent in
        return f"a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start + 1}"
    return None


def lone_surrogate(value: Any, where: str = "value") -> str | None:
    """Where a lone UTF-16 surrogate is in ``value`` (a string, or lists and dicts of them, keys included), or None.

    JSON's ``"\\ud800"`` escape and undecodable bytes in a command line (Python's surrogateescape) give such
    strings; they have no UTF-8 form, so SQLite, the tokenizer and a JSON response would all fail on them.
    """
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if found := _surrogate_in(item):
                return f"{path}: {found}"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and (found := _surrogate_in(key)):
                    return f"{path}: a key has {found}"
                stack.append((f"{path}.{key}", child))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def json_depth(value: Any) -> int:
    """How many lists and objects deep ``value`` nests: 0 for a scalar, 1 for ``{"a": 1}``, 2 for ``{"a": [1]}``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest
