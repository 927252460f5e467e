"""The domain exceptions of stella-search, in one place.

Every layer raises these; the HTTP layer maps each class to one status code and the CLI prints the message.
Messages say what to change, e.g. ``InvalidInputError("corpus.jsonl line 3: not JSON (...)")``.
"""

from __future__ import annotations


class StellaSearchError(Exception):
    """Base class: the message is written for the person who has to act on it."""


class InvalidInputError(StellaSearchError, ValueError):
    """A request, file or option that cannot be accepted as given (HTTP 400/422)."""


class PayloadTooLargeError(InvalidInputError):
    """A request body or batch over the configured limits (HTTP 413)."""


class InvalidSnapshotError(InvalidInputError):
    """A snapshot that is damaged, incomplete or not one (HTTP 400); nothing is restored from it.

    ``problem`` is the reason alone, as ``GET /snapshots`` shows it beside a broken snapshot.
    """

    def __init__(self, snapshot: str, problem: str):
        super().__init__(f"snapshot {snapshot} cannot be restored: {problem}")
        self.snapshot, self.problem = snapshot, problem


class NotFoundError(StellaSearchError, LookupError):
    """An unknown collection or document (HTTP 404)."""


class ConflictError(StellaSearchError):
    """The request conflicts with what exists, e.g. creating a collection that already exists (HTTP 409)."""


class CollectionExistsError(ConflictError):
    """Creating a collection that already exists (HTTP 409)."""


class ModelMismatchError(ConflictError):
    """A collection opened or written with another model, head or dimension than it was built with (HTTP 409)."""


class ModelUnavailableError(StellaSearchError):
    """Model weights that cannot be loaded here, e.g. Stella offline with nothing cached (HTTP 503)."""


class ModelLoadingError(ModelUnavailableError):
    """The model is still loading; retry shortly (HTTP 503 with Retry-After)."""


class CollectionBusyError(ConflictError):
    """Another process holds the collection's write lock (HTTP 409)."""


class ShardUnavailableError(StellaSearchError):
    """A shard of a collection served on Ray did not answer after retries (HTTP 503, Retry-After)."""


class CorruptCollectionError(StellaSearchError):
    """A collection's files cannot be read as a collection (not a database, vectors of another dimension than its
    manifest); they are left untouched for the operator, and the message says how to recover (HTTP 503)."""


class StorageUnavailableError(StellaSearchError):
    """The data folder cannot be written (read-only, a permission) or a file in it failed to read or write (an I/O
    error, a file removed underneath): unlike CorruptCollectionError it says nothing against the data, and the
    message says what failed (HTTP 503)."""


class InsufficientStorageError(StellaSearchError):
    """A write refused, or failed, for lack of space: the message names the data folder and its free space
    (HTTP 507)."""


class FaissNotInstalledError(StellaSearchError, ImportError):
    """Neither faiss-cpu nor faiss-gpu is importable."""
