"""pytest configuration of the micro-benchmarks (``pytest bench/ --benchmark-only``).

Options (also environment variables, so the grid is known when the test modules are collected):
    --bench-grid default|full      QIPO_BENCH_GRID   (see bench/cases.py)
    --bench-compile anchors|base|all|none  QIPO_BENCH_COMPILE
    --bench-save                   write the pytest-benchmark JSON to
                                   bench/results/<device>/<date>-<grid>[-<tag>].json (temp file + rename)
    --bench-tag TAG                a suffix for that file name
    --bench-note TEXT              a note stored with the results (e.g. "2 cores shared with other jobs")
    --bench-threads N              torch.set_num_threads(N) (1 = stable timings on a shared CPU)
QIPO_BENCH_DEVICE=cpu forces a CPU run on a GPU machine; QIPO_BENCH_BUDGET sets the seconds of
timed calls per benchmark.

The JSON's machine_info["qipo"] holds the device name, the measured matmul/copy peaks (roofline),
torch/triton versions, the backend table and the note.
"""
import os
import pathlib

import pytest

_SAVE = {}


def pytest_addoption(parser):
    g = parser.getgroup("qipo-bench")
    g.addoption("--bench-grid", choices=["default", "full"], default=None, help="benchmark grid size")
    g.addoption("--bench-compile", choices=["anchors", "base", "all", "none"], default=None,
                help="which cases are also run under torch.compile")
    g.addoption("--bench-save", action="store_true", default=False,
                help="save results to bench/results/<device>/<date>-<grid>[-<tag>].json")
    g.addoption("--bench-tag", default="", help="suffix of the saved file name")
    g.addoption("--bench-note", default="", help="free-text note stored in the results")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch.set_num_threads for the run (1 gives stable CPU timings on a shared machine)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("--bench-grid"):
        os.environ["QIPO_BENCH_GRID"] = config.getoption("--bench-grid")
    if config.getoption("--bench-compile"):
        os.environ["QIPO_BENCH_COMPILE"] = config.getoption("--bench-compile")
    if config.getoption("--bench-note"):
        os.environ["QIPO_BENCH_NOTE"] = config.getoption("--bench-note")
    if config.getoption("--bench-threads"):
        import torch

        torch.set_num_threads(config.getoption("--bench-threads"))
    if config.getoption("--bench-save"):
        if getattr(config.option, "benchmark_json", None):
            raise pytest.UsageError("give either --bench-save or --benchmark-json, not both")
        from bench._common import bench_device, results_dir, today
        from bench.cases import grid_mode

        d = results_dir(bench_device())
        os.makedirs(d, exist_ok=True)
        tag = config.getoption("--bench-tag")
        name = f"{today()}-{grid_mode()}{'-' + tag if tag else ''}.json"
        final = os.path.join(d, name)
        tmp = os.path.join(d, f".{name}.tmp")
        # pytest-benchmark < 5.3 takes an open file for --benchmark-json, >= 5.3 a path
        if _benchmark_json_takes_path():
            config.option.benchmark_json = pathlib.Path(tmp)
            _SAVE.update(tmp=tmp, final=final, fh=None)
        else:
            config.option.benchmark_json = open(tmp, "wb")
            _SAVE.update(tmp=tmp, final=final, fh=config.option.benchmark_json)


def _benchmark_json_takes_path() -> bool:
    from importlib.metadata import version

    parts = []
    for p in version("pytest-benchmark").split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= (5, 3)


def pytest_unconfigure(config):
    if not _SAVE:
        return
    fh = _SAVE["fh"]
    if fh is not None and not fh.closed:
        fh.close()
    tmp, final = _SAVE["tmp"], _SAVE["final"]
    if os.path.exists(tmp) and os.path.getsize(tmp) > 0:
        os.replace(tmp, final)  # atomic: the results file appears complete or not at all
        print(f"\nbenchmark results saved to {final}")
    elif os.path.exists(tmp):
        os.remove(tmp)
    _SAVE.clear()


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    import torch

    from bench._common import bench_device, cpu_model, device_name, measure_peaks, today
    from bench.cases import compile_mode, grid_mode
    from qipo_kernels import backends

    dev = bench_device()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        triton_version = None
    info = {
        "device": str(dev),
        "device_name": device_name(dev),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": today(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "grid": grid_mode(),
        "compile": compile_mode(),
        "note": os.environ.get("QIPO_BENCH_NOTE", ""),
        "backends": backends.table(),
        "peaks": measure_peaks(dev),
    }
    machine_info["qipo"] = info


@pytest.fixture(scope="session")
def device():
    from bench._common import bench_device

    return bench_device()
