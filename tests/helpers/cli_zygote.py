"""Imports the CLI once under the fault shim, then runs each ``stella-search`` command read from stdin in a forked
child, so that a faulted run does not pay for importing torch. Started by ``tests.helpers.faults.Cli``."""

import gc
import json
import os
import sys


def serve() -> None:
    """Import the CLI once, then run each command of stdin in a forked child: a fresh process without the imports."""
    import faiss  # noqa: F401
    import onnxruntime  # noqa: F401
    import sentence_transformers  # noqa: F401

    import indexer.pipeline  # noqa: F401
    import storage.snapshots  # noqa: F401
    from search_api.cli import main

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            code = 1
            try:
                main.main(args=request["argv"], prog_name="stella-search", standalone_mode=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                gc.collect()  # what an exiting interpreter closes: connections left open by an error path
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
