"""One figure of the CPU performance results, drawn from the benchmarks' JSON (nothing is measured here).

Left: ingest passages/s against the seed baseline of the same run, per corpus and backend
(``bench_ingest.json``). Right: requests/s by concurrent clients for the seed-configured, unbatched and
micro-batched servers (``bench_api_default.json``).

    python scripts/plot_performance.py      # writes scripts/results/performance.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest", type=Path, default=RESULTS / "bench_ingest.json")
    parser.add_argument("--api", type=Path, default=RESULTS / "bench_api_default.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "performance.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ingest = json.loads(args.ingest.read_text())
    api = json.loads(args.api.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    corpora = ingest["corpora"]
    paths = ["baseline", *corpora[0]["backends"]]
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        rates = [
            c["baseline"]["passages_per_s"] if path == "baseline" else c["backends"][path]["ingest"]["passages_per_s"]
            for c in corpora
        ]
        xs = [j + i * width for j in range(len(corpora))]
        bars = left.bar(xs, rates, width, label="seed baseline" if path == "baseline" else f"ingest, {path}")
        for bar, corpus in zip(bars, corpora):
            base = corpus["baseline"]["passages_per_s"]
            left.annotate(f"{bar.get_height() / base:.2f}x", (bar.get_x() + width / 2, bar.get_height()), ha="center")
    left.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(corpora))])
    left.set_xticklabels([f"{Path(c['corpus']).parent.name} ({c['passages']} passages)" for c in corpora])
    left.set_ylabel("passages/s")
    left.set_title("CPU ingest vs the seed baseline, same run")
    left.legend(fontsize=8)

    for name, label in [("seed", "seed-configured (torch)"), ("unbatched", "unbatched"), ("microbatched", "default")]:
        if name not in api:
            continue
        levels = api[name]["concurrency"]
        suffix = f" ({api[name]['backend']})" if name != "seed" else ""
        right.plot(
            [level["clients"] for level in levels],
            [level["requests_per_s"] for level in levels],
            marker="o",
            label=label + ("" if name == "seed" else suffix) + (", micro-batched" if api[name]["microbatch"] else ""),
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("requests/s")
    right.set_title("Search API on loopback, same run")
    right.legend(fontsize=8)
    fig.suptitle(f"2-core CPU, embedded MiniLM; from {args.ingest.name} and {args.api.name}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
