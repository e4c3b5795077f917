"""Load test: N concurrent streaming clients for D seconds against `fastserve serve`.

Every stream must end with `data: [DONE]` and no request may fail; the server's resident memory after
the load (and a short idle) must stay within a tolerance of its memory halfway through the load (why halfway:
see fastserve_cli/testing/load.py). Exit code 1 on any violation. Both growths are printed.

The issue's acceptance run is 64 clients for 60 s on the tiny model:

    .venv/bin/python scripts/load_serve.py MODEL_DIR --clients 64 --duration 60

(tests/test_serve_load.py runs the same check for 10 s, marked slow.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastserve_cli.testing.load import load_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument(
        "--rss-tolerance",
        type=float,
        default=0.10,
        help="Allowed RSS growth over the second half of the load (fraction).",
    )
    args = parser.parse_args()
    report = load_test(args.model_dir, args.clients, args.duration)
    print(
        f"{report.clients} clients x {report.duration_s:.0f} s: {report.requests} streams, {report.tokens} tokens, "
        f"{len(report.errors)} errors, {report.missing_done} without [DONE]; server RSS {report.rss_warm_mib:.0f} MiB "
        f"after warm-up, {report.rss_mid_mib:.0f} MiB halfway, {report.rss_after_mib:.0f} MiB after load "
        f"({report.rss_growth:+.1%} over the second half; {report.rss_growth_since_warmup:+.1%} since warm-up)"
    )
    for err in report.errors[:5]:
        print("  error:", err)
    sys.exit(0 if report.ok(args.rss_tolerance) else 1)


if __name__ == "__main__":
    main()
