"""Fail the Nth file write, sync or rename of an operation with ENOSPC or EIO, for every N, and check the data after
each, in the manner of SQLite's own I/O-error tests.

``tests/helpers/faultshim.c`` is compiled and loaded with ``LD_PRELOAD`` into the processes that do the work,
so SQLite's own C writes fail as well as Python's; it counts the calls on files under the folder that holds the data
and the snapshots, and fails the Nth with the errno asked, once (a transient error) or from then on (a full disk that
stays full). The operations: an upsert to a real ``stella-search serve``, and an ingest, a snapshot and an optimize
by the ``stella-search`` CLI (run in processes forked from one that has imported it, so a run does not pay for
importing torch). For N = 1, 2, ... until the operation makes fewer than N calls, each run is checked:

- the answer: a success, or a clear error (HTTP: not 500, and a 4xx/5xx carries a JSON ``detail`` other than
  "internal error"; CLI: exit 0, or a non-zero exit with an ``error:`` line and no traceback);
- the data: a success is stored whole; an error leaves each batch of the operation wholly written or not at all
  (the batches written first); every document acknowledged before is there by id with its text, title and
  metadata, and is found by its own text in a dense and in a lexical search; the vector and full-text indexes hold
  exactly SQLite's passages (``Collection.verify``); the collection opens; no temporary file or folder is left;
  the server's own view (for the upsert) agrees;
- recovery: the same operation succeeds once the fault is cleared.

    python scripts/faults.py --out scripts/results/faults.json            # every N of every operation and fault
    python scripts/faults.py --operations upsert,ingest --every 3         # every third N

The suite runs the same sweeps on a smaller corpus, with two to four values of N per sweep
(tests/storage/test_faults.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fault machinery lives with the tests that use it
from tests.helpers.faults import FAULTS, OPERATIONS, Bench, compile_shim  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operations", default=",".join(OPERATIONS), help=f"comma list of {', '.join(OPERATIONS)}")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    parser.add_argument("--every", type=int, default=1, help="try every Nth call only (1: all)")
    parser.add_argument(
        "--runs", type=int, help="instead of --every: about this many N per sweep, spread over its calls"
    )
    parser.add_argument("--documents", type=int, default=120, help="documents in the collection before the sweeps")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/faults.json"))
    args = parser.parse_args()

    from indexer.encoder import Encoder
    from indexer.settings import load_settings

    settings = load_settings(cli={"encoder": {"model": "minilm"}, "processing": {"device": "cpu"}})
    encoder = Encoder.load("minilm", settings)
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        library = compile_shim(Path(tmp))
        for operation in args.operations.split(","):
            bench = Bench(Path(tmp) / operation, encoder, settings, args.documents, library)
            for result in bench.run(operation, tuple(args.faults.split(",")), args.every, args.runs):
                results.append(result.summary())
                print(
                    f"{operation} {result.fault}: {result.calls} calls, {len(result.tried)} faulted runs "
                    f"({result.successes} answered success, {result.errors} error); problems: "
                    f"{len(result.answer_problems)} answer, {len(result.data_problems)} data, "
                    f"{len(result.recovery_problems)} recovery",
                    file=sys.stderr,
                )
    report = {
        "benchmark": "faults",
        "every": args.every,
        "runs": args.runs,
        "documents": args.documents,
        "sweeps": results,
        "data_problems": sum(len(r["data_problems"]) for r in results),
        "answer_problems": sum(len(r["answer_problems"]) for r in results),
        "recovery_problems": sum(len(r["recovery_problems"]) for r in results),
        "seconds": round(time.monotonic() - started, 1),
        "command": "python scripts/faults.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "sweeps"}, indent=2))
    return 1 if report["data_problems"] or report["answer_problems"] or report["recovery_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
