"""Fault injection under the data folder: an ``LD_PRELOAD`` shim (``faultshim.c``) that fails the Nth file
write, sync or rename with ENOSPC or EIO, the operations it is swept over, and the checks of the data after
each run. ``scripts/faults.py`` sweeps every N; tests/storage/test_faults.py a few N per sweep."""

from __future__ import annotations

import errno as errno_codes
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from tests.helpers.processes import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = Path(__file__).resolve().parent / "faultshim.c"
ZYGOTE = Path(__file__).resolve().parent / "cli_zygote.py"
CORPUS = ROOT / "tests" / "data" / "scifact" / "corpus.jsonl"
COLLECTION = "default"
OPERATIONS = ("upsert", "ingest", "snapshot", "optimize")
FAULTS = {  # name -> (errno, persistent)
    "ENOSPC": (errno_codes.ENOSPC, True),  # a full disk stays full until space is freed
    "EIO": (errno_codes.EIO, False),  # one failed write or sync
    "ENOSPC-once": (errno_codes.ENOSPC, False),
    "EIO-persistent": (errno_codes.EIO, True),
}
SUITE_FAULTS = ("ENOSPC", "EIO")
COLLECTION_FILES = {
    "collection.db",
    "collection.db-wal",
    "collection.db-shm",
    "index.faiss",
    "index.json",
    "write.lock",
}
TEMPORARY_MARKS = (".tmp", ".partial-", ".creating-", ".restore-", "-journal")
INTERNAL_ERROR = "internal error"
SAMPLE = 8  # documents besides the last operation's searched through the server after each run


def compile_shim(directory: Path) -> Path:
    """Build ``faultshim.so`` from ``faultshim.c`` with the C compiler (``CC``, else gcc or cc)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError(
            "no C compiler (gcc or cc, or CC) found: the fault-injection shim is C, loaded with LD_PRELOAD so that "
            "SQLite's own writes fail too. Install gcc (apt-get install gcc)."
        )
    library = Path(directory) / "faultshim.so"
    command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(SHIM_SOURCE), "-ldl", "-lpthread"]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"compiling the fault shim failed: {' '.join(command)}\n{built.stderr}")
    return library


class Shim:
    """The control side of a loaded ``faultshim.so``: arm it for one operation, disarm it, read what it counted."""

    def __init__(self, library: Path, disk: Path, harness: Path):
        self.library = library
        self.disk = disk
        self.control = harness / "fault-control"
        self.count = harness / "fault-count"
        self.generation = 0

    def environment(self) -> dict[str, str]:
        preload = " ".join(p for p in (str(self.library), os.environ.get("LD_PRELOAD", "")) if p)
        return {
            **os.environ,
            "LD_PRELOAD": preload,
            "FAULT_DIR": str(self.disk),
            "FAULT_CONTROL": str(self.control),
            "FAULT_COUNT": str(self.count),
        }

    def arm(self, at: int, code: int, persistent: bool, ops: str = "write,sync,rename") -> None:
        """Fail the ``at``-th counted call from now on with ``code`` (and every later one when ``persistent``)."""
        self.generation += 1
        self.count.unlink(missing_ok=True)
        tmp = self.control.with_name(self.control.name + ".new")
        tmp.write_text(f"{self.generation} {at} {code} {int(persistent)} {ops}\n")
        os.replace(tmp, self.control)

    def disarm(self) -> None:
        self.control.unlink(missing_ok=True)

    def counted(self) -> tuple[int, int]:
        """(calls counted since ``arm``, number of the first call failed or 0)."""
        try:
            generation, calls, fired = (int(x) for x in self.count.read_text().split())
        except (OSError, ValueError):
            return 0, 0
        return (calls, fired) if generation == self.generation else (0, 0)


class Cli:
    """``stella-search`` commands run in children of one process that imported the CLI under the shim."""

    def __init__(self, shim: Shim, harness: Path):
        self.harness = harness
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=shim.environment(),
            text=True,
            cwd=harness,
        )

    def run(self, *argv: str) -> dict:
        """Run one command: its exit status, stdout and stderr."""
        stdout, stderr = self.harness / "cli.out", self.harness / "cli.err"
        request = {"argv": list(argv), "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError("the CLI runner died")
        return {"exit": json.loads(reply)["exit"], "stdout": stdout.read_text(), "stderr": stderr.read_text()}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Server(ServerProcess):
    """A real ``stella-search serve`` with the shim loaded, until /ready answers 200."""

    def __init__(self, shim: Shim, data_dir: Path, log: Path):
        super().__init__(data_dir, log, env=shim.environment())
        self.start()
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def close(self) -> None:
        self.http.close()
        self.stop()


@dataclass(frozen=True)
class Doc:
    id: str
    title: str | None
    text: str
    metadata: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"id": self.id, "title": self.title, "text": self.text, "metadata": self.metadata}


def corpus_texts(count: int, offset: int = 0) -> list[tuple[str | None, str]]:
    """(title, text) of ``count`` scifact records from ``offset``, each cut to its first 40 words: one passage."""
    out = []
    with open(CORPUS, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if number < offset:
                continue
            record = json.loads(line)
            out.append((record.get("title") or None, " ".join(record["text"].split()[:40])))
            if len(out) == count:
                break
    return out


class Ledger:
    """What the collection must hold: every acknowledged document, and the batches of an unacknowledged operation
    (each written wholly or not at all, those before written first)."""

    def __init__(self, texts: list[tuple[str | None, str]]):
        self.texts = texts
        self.next_text = 0
        self.next_id = 0
        self.expected: dict[str, Doc] = {}
        self.pending: list[list[tuple[str, Doc | None, Doc]]] = []
        self.touched: list[str] = []  # the documents of the last operation

    def _text(self) -> tuple[str | None, str]:
        title, text = self.texts[self.next_text % len(self.texts)]
        rounds, self.next_text = self.next_text // len(self.texts), self.next_text + 1
        return title, text if rounds == 0 else f"{text} (revision {rounds})"

    def new(self) -> Doc:
        self.next_id += 1
        title, text = self._text()
        return Doc(f"doc-{self.next_id}", title, text, {"key": f"doc-{self.next_id}"})

    def revision(self, doc_id: str) -> Doc:
        title, text = self._text()
        return replace(self.expected[doc_id], title=title, text=text)

    def propose(self, batches: list[list[Doc]]) -> None:
        self.pending = [[(d.id, self.expected.get(d.id), d) for d in batch] for batch in batches]
        self.touched = [d.id for batch in batches for d in batch]

    def acknowledge(self) -> None:
        for batch in self.pending:
            for doc_id, _, after in batch:
                self.expected[doc_id] = after
        self.pending = []

    def settle(self, observe) -> list[str]:
        """Adopt what an unacknowledged operation left (``observe(id)``: the stored Doc or None); its problems."""
        problems, landed = [], []
        for batch in self.pending:
            states = []
            for doc_id, before, after in batch:
                seen = observe(doc_id)
                if seen == after:
                    states.append(True)
                elif seen == before:
                    states.append(False)
                else:
                    problems.append(f"{doc_id} is {seen}, neither before ({before}) nor after ({after}) the write")
                    continue
                if seen is None:
                    self.expected.pop(doc_id, None)
                else:
                    self.expected[doc_id] = seen
            if len(set(states)) > 1:
                problems.append(f"a batch was written in part: {[d for d, _, _ in batch]} -> {states}")
            landed.append(all(states))
        if any(later and not earlier for earlier, later in zip(landed, landed[1:])):
            problems.append(f"a later batch was written without an earlier one: {landed}")
        self.pending = []
        return problems


class Verifier:
    """Checks a collection on disk (and a server's view of it) against the ledger."""

    def __init__(self, encoder, k: int = 10):
        self.encoder = encoder
        self.k = k
        self.vectors: dict[str, object] = {}

    def _vectors(self, texts: list[str]):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.encoder.encode_queries(missing)))
        return np.stack([self.vectors[t] for t in texts]) if texts else None

    def on_disk(self, disk: Path, ledger: Ledger) -> list[str]:
        from storage.collection import Collection

        path = disk / "data" / COLLECTION
        try:
            collection = Collection.open(path, use_gpu=False)
        except Exception as exc:
            return [f"the collection does not open: {type(exc).__name__}: {exc}"]
        with collection:

            def observe(doc_id: str) -> Doc | None:
                with collection.connection() as db:
                    rows = list(db["documents"].rows_where("id = ?", [doc_id]))
                if not rows:
                    return None
                return Doc(rows[0]["id"], rows[0]["title"], rows[0]["text"], json.loads(rows[0]["metadata"]))

            problems = ledger.settle(observe)
            problems += [f"{k}: {v[:10]}" for k, v in collection.verify().items() if v]
            docs = list(ledger.expected.values())
            for doc in docs:
                if observe(doc.id) != doc:
                    problems.append(f"{doc.id}: acknowledged as {doc}, stored as {observe(doc.id)}")
            if docs:
                dense = collection.search(self._vectors([d.text for d in docs]), k=self.k)
                for doc, hits in zip(docs, dense):
                    if doc.id not in {h.document_id for h in hits}:
                        problems.append(f"{doc.id}: a dense search for its own text does not find it")
                for doc in docs:
                    if doc.id not in {h.document_id for h in collection.search_lexical(doc.text, k=self.k)}:
                        problems.append(f"{doc.id}: a lexical search for its own text does not find it")
            if collection.count_documents() != len(ledger.expected):
                problems.append(f"{collection.count_documents()} documents stored, {len(ledger.expected)} expected")
        return problems + leftovers(disk)

    def served(self, http: httpx.Client, ledger: Ledger) -> list[str]:
        """The server's own view: its index counts, every expected document by id, and the last operation's documents
        and a sample of the others by their own text (encoding every text on each run would dominate the sweep)."""
        problems = []
        health = http.get("/health").json()["collections"][COLLECTION]
        if health["index_vectors"] != health["passages"]:
            problems.append(f"served index holds {health['index_vectors']} vectors, SQLite {health['passages']}")
        for doc in ledger.expected.values():
            response = http.get(f"/collections/{COLLECTION}/documents/{doc.id}")
            if response.status_code != 200:
                problems.append(f"{doc.id}: served as {response.status_code}")
                continue
            body = response.json()
            if Doc(body["id"], body["title"], body["text"], body["metadata"]) != doc:
                problems.append(f"{doc.id}: served as {body}")
        others = sorted(set(ledger.expected) - set(ledger.touched))
        sample = [ledger.expected[i] for i in ledger.touched if i in ledger.expected]
        docs = sample + [
            ledger.expected[i] for i in random.Random(len(others)).sample(others, min(SAMPLE, len(others)))
        ]
        for mode in ("dense", "lexical"):
            for start in range(0, len(docs), 256):
                chunk = docs[start : start + 256]
                body = {"queries": [d.text for d in chunk], "k": self.k, "mode": mode, "group_by": "document"}
                response = http.post(f"/collections/{COLLECTION}/search/batch", json=body)
                if response.status_code != 200:
                    problems.append(f"served {mode} search answered {response.status_code}: {response.text[:200]}")
                    continue
                for doc, found in zip(chunk, response.json()["responses"]):
                    if doc.id not in {h["id"] for h in found["results"]}:
                        problems.append(f"{doc.id}: the server's {mode} search for its own text does not find it")
        return problems


def leftovers(disk: Path) -> list[str]:
    """Temporary files or folders left under ``disk``, and unexpected files in the collection's folder."""
    found = []
    for path in disk.rglob("*"):
        if any(mark in path.name for mark in TEMPORARY_MARKS):
            found.append(f"left behind: {path.relative_to(disk)}")
    collection = disk / "data" / COLLECTION
    for path in collection.iterdir() if collection.is_dir() else []:
        if path.name not in COLLECTION_FILES and not any(mark in path.name for mark in TEMPORARY_MARKS):
            found.append(f"unexpected file in the collection: {path.name}")
    return found


def answer_problems(answer: dict) -> list[str]:
    """Whether an answer is a success or a clear error (see the module docstring)."""
    if "status" in answer:
        status, detail = answer["status"], answer.get("detail")
        if status < 400:
            return []
        if status == 500 or not isinstance(detail, str) or detail.startswith(INTERNAL_ERROR):
            return [f"HTTP {status}: {answer['body'][:300]}"]
        return []
    if answer["exit"] == 0:
        return []
    lines = answer["stderr"].splitlines()
    if "Traceback" in answer["stderr"] or not any(line.startswith("error: ") for line in lines):
        tail = "\n".join(lines[-6:])
        return [f"CLI exit {answer['exit']} without a one-line error:\n{tail}"]
    return []


def _brief(answer: dict) -> str:
    if "status" in answer:
        return f"HTTP {answer['status']}"
    return f"exit {answer['exit']}" + (
        f" ({answer['stderr'].strip().splitlines()[-1][:120]})" if answer["exit"] else ""
    )


def succeeded(answer: dict) -> bool:
    return answer.get("status", 500) < 300 if "status" in answer else answer["exit"] == 0


class Operation:
    """One kind of operation: ``run`` it (armed or not) and say what it must have changed."""

    name = ""

    def __init__(self, disk: Path, ledger: Ledger):
        self.disk = disk
        self.data = disk / "data"
        self.ledger = ledger

    def prepare(self) -> None:
        """Choose the next run's content and tell the ledger what it would write."""

    def run(self) -> dict:
        raise NotImplementedError

    def after(self, answer: dict, armed: bool) -> list[str]:
        """Problems specific to this operation, given its answer."""
        return []


class Upsert(Operation):
    """Two new documents and a new version of an existing one, in one request."""

    name = "upsert"

    def __init__(self, disk: Path, ledger: Ledger, server: Server):
        super().__init__(disk, ledger)
        self.server = server
        self.docs: list[Doc] = []

    def prepare(self) -> None:
        replaced = sorted(self.ledger.expected)[self.ledger.next_id % len(self.ledger.expected)]
        self.docs = [self.ledger.new(), self.ledger.new(), self.ledger.revision(replaced)]
        self.ledger.propose([self.docs])

    def run(self) -> dict:
        body = {"documents": [d.record() for d in self.docs]}
        response = self.server.http.post(f"/collections/{COLLECTION}/documents", json=body)
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        return {"status": response.status_code, "detail": detail, "body": response.text}


class Ingest(Operation):
    """A JSONL file of a new version of an existing document and a new document, committed one at a time."""

    name = "ingest"

    def __init__(self, disk: Path, ledger: Ledger, cli: Cli, harness: Path):
        super().__init__(disk, ledger)
        self.cli = cli
        self.file = harness / "ingest.jsonl"
        self.config = harness / "ingest.yaml"
        self.config.write_text("ingest:\n  commit_documents: 1\n")

    def prepare(self) -> None:
        replaced = sorted(self.ledger.expected)[self.ledger.next_id % len(self.ledger.expected)]
        docs = [self.ledger.revision(replaced), self.ledger.new()]
        self.file.write_text("".join(json.dumps(d.record()) + "\n" for d in docs))
        self.ledger.propose([docs[:1], docs[1:]])

    def run(self) -> dict:
        return self.cli.run(
            "ingest", str(self.file), "--data-dir", str(self.data), "--collection", COLLECTION,
            "--config", str(self.config), "--device", "cpu",
        )  # fmt: skip


class Snapshot(Operation):
    """A snapshot into a new folder beside the data; on success it must verify and hold the collection's counts."""

    name = "snapshot"

    def __init__(self, disk: Path, ledger: Ledger, cli: Cli):
        super().__init__(disk, ledger)
        self.cli = cli
        self.destination = disk

    def prepare(self) -> None:
        self.destination = next(
            path for n in itertools.count(1) if not (path := self.disk / "snapshots" / f"snapshot-{n}").exists()
        )

    def run(self) -> dict:
        return self.cli.run(
            "snapshot", "--data-dir", str(self.data), "--collection", COLLECTION, "--out", str(self.destination)
        )

    def after(self, answer: dict, armed: bool) -> list[str]:
        from storage.snapshots import verify_snapshot

        if not self.destination.exists():
            return [f"snapshot {self.destination.name} answered success but is missing"] if succeeded(answer) else []
        try:
            info = verify_snapshot(self.destination)
        except Exception as exc:
            return [f"snapshot {self.destination.name} is in place but does not verify: {exc}"]
        if info["documents"] != len(self.ledger.expected):
            return [f"snapshot {self.destination.name} holds {info['documents']} documents, not "
                    f"{len(self.ledger.expected)}"]  # fmt: skip
        return []


class Optimize(Operation):
    """Rebuild the vector index as the other of HNSW32 and Flat; on success the manifest names the new type."""

    name = "optimize"
    TYPES = {"IDMap2,Flat": "HNSW32", "IDMap2,HNSW32": "Flat"}

    def __init__(self, disk: Path, ledger: Ledger, cli: Cli):
        super().__init__(disk, ledger)
        self.cli = cli
        self.before = self.wanted = ""

    def _index_type(self) -> str:
        from storage.collection import Collection

        return Collection.read_manifest(self.data / COLLECTION).index_type

    def prepare(self) -> None:
        self.before = self._index_type()
        self.wanted = self.TYPES[self.before]

    def run(self) -> dict:
        return self.cli.run(
            "optimize", "--data-dir", str(self.data), "--collection", COLLECTION, "--index", self.wanted
        )

    def after(self, answer: dict, armed: bool) -> list[str]:
        now = self._index_type()
        wanted = f"IDMap2,{self.wanted}"
        if succeeded(answer) and now != wanted:
            return [f"optimize to {wanted} answered success, but the manifest says {now}"]
        if now not in (self.before, wanted):
            return [f"after optimize from {self.before} to {wanted} the manifest says {now}"]
        return []


@dataclass
class Sweep:
    """The outcome of one operation under one fault, for each N tried."""

    operation: str
    fault: str
    calls: int = 0  # calls the operation makes under the data folder (the last, unfaulted run)
    tried: list[int] = field(default_factory=list)
    successes: int = 0
    errors: int = 0
    answer_problems: list[str] = field(default_factory=list)
    data_problems: list[str] = field(default_factory=list)
    recovery_problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "operation": self.operation,
            "fault": self.fault,
            "calls": self.calls,
            "runs_faulted": len(self.tried),
            "n_tried": self.tried,
            "answered_success": self.successes,
            "answered_error": self.errors,
            "answer_problems": self.answer_problems,
            "data_problems": self.data_problems,
            "recovery_problems": self.recovery_problems,
        }


def sweep(
    operation: Operation,
    shim: Shim,
    verifier: Verifier,
    fault: str,
    every: int = 1,
    first: float = 1,
    server: Server | None = None,
    runs: int | None = None,
) -> Sweep:
    """Run ``operation`` with its Nth call failed by ``fault``; check each run and the unfaulted run after it.

    A counting run comes first (no fault: C calls). With ``every`` 1, N = 1, 2, ... until the operation makes fewer
    than N calls; else N = first, first + every, ... up to C, and the last three calls (where a write commits).
    ``runs`` sets ``every`` to about C / runs, and ``first`` is then taken as a fraction of it (0 <= first < 1), so
    that sweeps under several faults fail different calls.
    """
    code, persistent = FAULTS[fault]
    result = Sweep(operation.name, fault)
    ledger = operation.ledger

    def run(at: int) -> tuple[dict, int, int]:
        operation.prepare()
        shim.arm(at, code, persistent)
        try:
            answer = operation.run()
        finally:
            shim.disarm()
        calls, fired = shim.counted()
        if calls == 0:
            raise RuntimeError(f"{operation.name}: the shim counted no calls; is LD_PRELOAD reaching it?")
        return answer, calls, fired

    def check(where: str, answer: dict, armed: bool) -> None:
        if succeeded(answer):
            ledger.acknowledge()
        elif not armed:
            result.recovery_problems.append(f"{where}: the {operation.name} failed without a fault: {_brief(answer)}")
        problems = operation.after(answer, armed) + verifier.on_disk(operation.disk, ledger)
        if server is not None:
            problems += verifier.served(server.http, ledger)
        result.data_problems += [f"{where}: {p}" for p in problems]

    answer, result.calls, _ = run(0)
    check(f"{fault} counting run", answer, armed=False)
    if runs is not None:
        every = max(1, math.ceil(result.calls / runs))
        first = 1 + int(first * every)
    if every == 1:
        plan = itertools.count(1)
    else:
        tail = range(max(1, result.calls - 2), result.calls + 1)
        plan = iter(sorted(set(range(int(first), result.calls + 1, every)) | set(tail)))
    for n in plan:
        where = f"{fault} N={n}"
        answer, calls, fired = run(n)
        if not fired:  # past the operation's last call: it ran without a fault
            check(f"{where} (no fault: {calls} calls)", answer, armed=False)
            break
        result.tried.append(n)
        result.successes += succeeded(answer)
        result.errors += not succeeded(answer)
        result.answer_problems += [f"{where}: {p}" for p in answer_problems(answer)]
        check(where, answer, armed=True)
        again, _, _ = run(0)
        check(f"{where}, then unfaulted", again, armed=False)
        print(f"{where} {operation.name}: {_brief(answer)}, then {_brief(again)}", file=sys.stderr, flush=True)
    return result


def seed_collection(disk: Path, ledger: Ledger, encoder, settings, documents: int) -> None:
    """The collection every sweep starts from: ``documents`` acknowledged documents, written without faults."""
    from indexer.pipeline import ingest_documents
    from storage.collection import Collection, Document

    docs = [ledger.new() for _ in range(documents)]
    with Collection.create(disk / "data" / COLLECTION, encoder.manifest(), use_gpu=False) as collection:
        ingest_documents(
            collection, encoder, [Document(d.id, d.title, d.text, d.metadata) for d in docs], settings, quiet=True
        )
    ledger.propose([docs])
    ledger.acknowledge()


@dataclass
class Bench:
    """A data folder seeded with a collection, the shim, and the processes that run operations under it."""

    root: Path
    encoder: object
    settings: object
    documents: int
    library: Path | None = None

    def __post_init__(self) -> None:
        self.disk = self.root / "disk"
        self.harness = self.root / "harness"
        self.harness.mkdir(parents=True, exist_ok=True)
        self.library = self.library or compile_shim(self.harness)
        self.shim = Shim(self.library, self.disk, self.harness)
        self.ledger = Ledger(corpus_texts(self.documents + 400))
        self.verifier = Verifier(self.encoder)
        seed_collection(self.disk, self.ledger, self.encoder, self.settings, self.documents)
        (self.disk / "snapshots").mkdir()

    def run(self, operation: str, faults: tuple[str, ...], every: int = 1, runs: int | None = None) -> list[Sweep]:
        """Sweep ``operation`` under each of ``faults`` (every ``every``-th N, or about ``runs`` N spread over its
        calls); the sweeps of one operation share the collection."""

        def offset(number: int) -> float:
            return number / len(faults) if runs else 1 + number % every

        sweeps = []
        if operation == "upsert":
            server = Server(self.shim, self.disk / "data", self.harness / "server.log")
            try:
                for number, fault in enumerate(faults):
                    op = Upsert(self.disk, self.ledger, server)
                    sweeps.append(sweep(op, self.shim, self.verifier, fault, every, offset(number), server, runs))
            finally:
                server.close()
            return sweeps
        cli = Cli(self.shim, self.harness)
        try:
            for number, fault in enumerate(faults):
                op = {
                    "ingest": lambda: Ingest(self.disk, self.ledger, cli, self.harness),
                    "snapshot": lambda: Snapshot(self.disk, self.ledger, cli),
                    "optimize": lambda: Optimize(self.disk, self.ledger, cli),
                }[operation]()
                sweeps.append(sweep(op, self.shim, self.verifier, fault, every, offset(number), runs=runs))
        finally:
            cli.close()
        return sweeps
