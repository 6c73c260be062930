"""Run the micro-benchmarks and write the report in one command.

    python -m bench [pytest options]          # = pytest bench/ --benchmark-only --bench-save ..., then the report
    python -m bench --bench-grid full --bench-threads 4

Equivalent to::

    pytest bench/ --benchmark-only --bench-save [options]
    python -m bench.report
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every benchmark (extra pytest options in argv), save the results, build the report.

    Returns pytest's exit code if the benchmarks failed, else the report's (0 on success).
    """
    import pytest

    argv = list(sys.argv[1:] if argv is None else argv)
    root = os.path.dirname(BENCH_DIR)
    if root not in sys.path:
        sys.path.insert(0, root)
    args = [BENCH_DIR, "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    if "--benchmark-json" not in " ".join(argv) and "--bench-save" not in argv:
        args.append("--bench-save")
    rc = int(pytest.main(args + argv))
    if rc != 0:
        return rc
    from .report import main as report_main

    return report_main([])
