"""Kill the server while several clients write, restart it, and prove that no acknowledged write was lost.

A real `stella-search serve` process on a free 127.0.0.1 port. Several client threads write at once: each upserts
new documents, replaces its own documents and deletes them (by id, one by one, and by metadata filter), and records
every operation the server acknowledged. Each client owns its documents, so what each one should find is exact
however the threads interleave. At a random moment the server gets SIGKILL (or, in some rounds, SIGTERM and then
SIGKILL a moment later, which can land during the shutdown's index checkpoint; with ``--aim-deletes``, a SIGKILL
a moment after a delete's request is sent). After each restart every acknowledged document is checked, and each
failure is counted by kind:

- ``not_found``: an acknowledged upsert whose document the server does not return by id;
- ``wrong_text``: returned by id, but with another text, title or metadata (an older version, say);
- ``dense_missing``: returned by id, but a dense search for its own text, restricted by a metadata filter to that
  document, does not find it (the vector index lacks a vector SQLite has);
- ``lexical_missing``: the same with a lexical (BM25) search (the full-text index lacks it);
- ``resurrected``: an acknowledged delete whose document is back.

A search for a document's own text that misses it in the unfiltered top ``--k`` but finds it with the filter is
a ranking miss, counted apart (not a loss). An operation in flight at the kill may have landed or not: the checker
accepts either and learns which (counted per kind of operation: a delete answered by nobody may well have been
applied), but it must have landed whole (``partial_write`` otherwise). The index must hold exactly the stored
passages (``index_count``). The JSON result has the counts per kind, the kills and the operations, and the loss
rate per acknowledged document write with a one-sided 95% Clopper-Pearson upper bound (about 3/N when nothing was
lost in N writes). Bounded in kills and time.

    python scripts/crasher.py --kills 300 --clients 4 --out scripts/results/crasher.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checker lives with the tests that prove it
from tests.helpers.crash import (  # noqa: E402
    Checker,
    Client,
    clopper_pearson_upper,
    load_excerpts,
)
from tests.helpers.processes import ServerProcess  # noqa: E402


def start(server: ServerProcess) -> None:
    try:
        server.start()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def run(args: argparse.Namespace, data_dir: Path, log_path: Path) -> dict:
    started = time.monotonic()
    rng = random.Random(args.seed)
    excerpts = load_excerpts(args.seed)
    clients = [
        Client(n, args.seed, excerpts, args.clients, max(3, args.documents // args.clients), args.batch)
        for n in range(args.clients)
    ]
    checker = Checker(args.k, args.seed)
    kills = {"sigkill": 0, "sigterm_then_sigkill": 0, "sigkill_aimed_at_a_delete": 0}
    server = ServerProcess(data_dir, log_path, "--model", "minilm")
    start(server)
    httpx.post(f"{server.url}/collections", json={"name": "default", "model": "minilm"}).raise_for_status()
    while sum(kills.values()) < args.kills and time.monotonic() - started < args.max_seconds:
        stop = threading.Event()
        threads = [threading.Thread(target=c.run, args=(server.url, stop), daemon=True) for c in clients]
        for client in clients:
            client.acknowledged.clear()
        for thread in threads:
            thread.start()
        # the clock starts at the round's first acknowledged write: the first ones wait for the encoder to load
        deadline = time.monotonic() + 300
        while not any(c.acknowledged.is_set() for c in clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(args.min_run, args.max_run))
        aimed = rng.choice(clients) if rng.random() < args.aim_deletes else None
        if aimed is not None:  # the kill lands a moment after a delete's request is sent
            aimed.delete_sent.clear()
            aimed.aimed.set()
            aimed.delete_sent.wait(timeout=120)
            time.sleep(rng.uniform(0.0, args.aim_window))
            server.kill()
            kills["sigkill_aimed_at_a_delete"] += 1
        else:
            term = rng.random() < args.term_fraction
            server.kill(term_first=rng.uniform(0.0, 1.0) if term else None)
            kills["sigterm_then_sigkill" if term else "sigkill"] += 1
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        if aimed is not None:
            aimed.aimed.clear()
        start(server)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            checker.check(http, clients)
        lost = sum(checker.losses.values())
        print(
            f"kill {sum(kills.values())}: {sum(sum(c.ops.values()) for c in clients)} ops acknowledged, "
            f"{sum(len(c.present()) for c in clients)} documents present, lost {lost}",
            file=sys.stderr,
        )
        save(args.out, report(args, clients, checker, kills, time.monotonic() - started, finished=False))
    server.stop()
    return report(args, clients, checker, kills, time.monotonic() - started, finished=True)


def save(out: Path, result: dict) -> None:
    """Write the result atomically: a long run leaves its figures so far after every round."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def report(
    args: argparse.Namespace, clients: list[Client], checker: Checker, kills: dict, seconds: float, finished: bool
) -> dict:
    ops = {kind: sum(c.ops[kind] for c in clients) for kind in clients[0].ops}
    writes = {kind: sum(c.document_writes[kind] for c in clients) for kind in ("upserted", "deleted")}
    acknowledged = sum(writes.values())
    lost = sum(checker.losses.values())
    return {
        "benchmark": "crasher",
        "kills": sum(kills.values()),
        **kills,
        "clients": args.clients,
        "acknowledged_ops": sum(ops.values()),
        "acknowledged_ops_by_kind": ops,
        "acknowledged_document_writes": acknowledged,
        "acknowledged_document_writes_by_kind": writes,
        "in_flight_ops_at_kill": sum(c.in_flight_ops for c in clients),
        "in_flight_ops_landed": checker.in_flight,
        "losses_by_kind": checker.losses,
        "lost": lost,
        "invariant_violations_by_kind": checker.invariants,
        "ranking_misses": checker.ranking_misses,
        "checks": checker.checks,
        "loss_rate": {
            "per": "acknowledged document write",
            "estimate": lost / acknowledged if acknowledged else None,
            "upper_95": clopper_pearson_upper(lost, acknowledged),
            "method": "one-sided Clopper-Pearson; with 0 losses in N it is 1 - 0.05^(1/N), about 3/N",
        },
        "violations": checker.violations,
        "documents_present_at_end": sum(len(c.present()) for c in clients),
        "settings": {
            "k": args.k,
            "documents": args.documents,
            "batch": args.batch,
            "min_run": args.min_run,
            "max_run": args.max_run,
            "term_fraction": args.term_fraction,
            "aim_deletes": args.aim_deletes,
            "aim_window": args.aim_window,
        },
        "seconds": round(seconds, 1),
        "seed": args.seed,
        "finished": finished,
        "command": "python scripts/crasher.py " + " ".join(sys.argv[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long, kills or not")
    parser.add_argument("--clients", type=int, default=4, help="writing threads, each with its own documents")
    parser.add_argument(
        "--min-run", type=float, default=0.3, help="shortest writing before a kill (after the first ack)"
    )
    parser.add_argument(
        "--max-run", type=float, default=3.0, help="longest writing before a kill (after the first ack)"
    )
    parser.add_argument("--term-fraction", type=float, default=0.2, help="kills that are SIGTERM, then SIGKILL")
    parser.add_argument(
        "--aim-deletes", type=float, default=0.0, help="kills that land a moment after a delete's request is sent"
    )
    parser.add_argument("--aim-window", type=float, default=0.05, help="longest such moment, in seconds")
    parser.add_argument("--batch", type=int, default=8, help="most documents per upsert")
    parser.add_argument("--documents", type=int, default=400, help="about how many documents the clients keep")
    parser.add_argument("--k", type=int, default=10, help="depth of the self-searches")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, help="kept, with the server's log beside it (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/crasher.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        result = run(args, data_dir, data_dir.parent / "crasher-server.log")
    save(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "violations"}, indent=2))
    failed = result["lost"] or any(result["invariant_violations_by_kind"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
