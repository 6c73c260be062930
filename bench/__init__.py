"""Benchmarks of qipo_kernels: micro-benchmarks (pytest-benchmark), a report, a speed-accuracy study.

    pytest bench/ --benchmark-only --bench-save       # time every op x backend, save JSON
    python -m bench.report                            # tables + plots from bench/results/
    python -m bench.speed_accuracy                    # solver x steps error / time / quality study

Results live in bench/results/<device-name>/. This directory is not part of the installed package;
run these commands from the repository root.
"""
