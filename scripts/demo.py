"""`make run`'s last step: serve the demo collection, print sample queries through the client, keep serving.

python scripts/demo.py --data-dir data --port 8000            # Ctrl-C stops the server
python scripts/demo.py --data-dir data --port 8000 --exit     # stop after the sample queries
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from search_api.client import SearchClient

QUERIES = ["guitar chord tuning", "films of the Coen brothers with John Turturro"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--exit", action="store_true", help="stop the server after the sample queries")
    args = parser.parse_args()

    url = f"http://{args.host}:{args.port}"
    stella = os.path.join(os.path.dirname(sys.executable), "stella-search")
    command = [stella, "serve", "--data-dir", args.data_dir, "--host", args.host, "--port", str(args.port)]
    server = subprocess.Popen(command)
    try:
        with SearchClient(url, retries=8, backoff=0.25) as client:
            deadline = time.monotonic() + 120
            while client.health().status != "ok":
                if server.poll() is not None or time.monotonic() > deadline:
                    print("the server did not come up; see its log above", file=sys.stderr)
                    return 1
                time.sleep(0.25)
            for query in QUERIES:
                response = client.search(query, k=3)
                print(
                    f"\nPOST {url}/collections/default/search  {{'query': {query!r}, 'k': 3}}"
                    f"  ({response.took_ms:.1f} ms)"
                )
                for rank, hit in enumerate(response.results, start=1):
                    print(f"  {rank}. {hit.score:.3f} {hit.title or hit.id}: {hit.text[:100]}...")
        print(
            f"\nServing {args.data_dir} on {url} (API docs at {url}/docs). Try:\n"
            f"  curl -s {url}/collections/default/search -H 'content-type: application/json' "
            f'-d \'{{"query": "civic-military airports", "k": 3}}\'\n'
        )
        if args.exit:
            return 0
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
