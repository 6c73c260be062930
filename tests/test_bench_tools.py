"""Tests of the benchmark tooling in bench/: FLOP counts, the report's ratios, the speed-accuracy errors."""
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_train_step as TS  # noqa: E402
from bench import flops as F  # noqa: E402
from bench import report as R  # noqa: E402
from bench import speed_accuracy as SA  # noqa: E402
from qipo_kernels import ConditionalMLP, DoubleCritic, ops  # noqa: E402
from qipo_kernels.reference.paths import alpha_sigma  # noqa: E402


# ----------------------------------------------------------------------------- FLOP counter
def test_mlp_flops_hand_count():
    net = ConditionalMLP(6, 17, hidden=32, depth=2)  # sinusoidal, t_dim 16
    # time MLP: Linear(16, 32) + Linear(32, 16); trunk: Linear(6+16+17, 32), Linear(32, 32), Linear(32, 6)
    hand = 2 * 16 * 32 + 2 * 32 * 16 + 2 * 39 * 32 + 2 * 32 * 32 + 2 * 32 * 6
    assert hand == 6976
    assert F.mlp_flops_per_row(net) == hand
    assert F.mlp_flops_per_row(net.config()) == hand
    assert F.mlp_params(net) == sum(p.numel() for p in net.parameters())
    raw = ConditionalMLP(3, 5, hidden=7, depth=3, time_embedding="raw")
    assert F.mlp_flops_per_row(raw) == 2 * (3 + 1 + 5) * 7 + 2 * 2 * 7 * 7 + 2 * 7 * 3
    assert F.mlp_params(raw) == sum(p.numel() for p in raw.parameters())


def test_critic_flops_hand_count():
    c = DoubleCritic(17, 6, hidden=8, depth=2)
    head = 2 * 23 * 8 + 2 * 8 * 8 + 2 * 8 * 1
    assert F.critic_flops_per_row(c) == 2 * head
    assert F.critic_params(c) == sum(p.numel() for p in c.parameters())


def test_flops_match_torch_flop_counter():
    """Independent check: torch's FlopCounterMode counts exactly the matmul FLOPs of integrate / act."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=24, depth=3).eval()
    critic = DoubleCritic(17, 6, hidden=20, depth=2).eval()
    B, K = 3, 5
    x0, obs = torch.randn(B, K, 6), torch.randn(B, 17)
    for solver, steps in (("euler", 3), ("rk4", 2), ("dpm2", 2)):
        path = "vp" if solver == "dpm2" else None
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ops.integrate(net, x0, obs, steps=steps, solver=solver, path=path, backend="torch")
        assert fc.get_total_flops() == F.integrate_cost(net, B * K, steps, solver, obs_rows=B)[0]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ops.act(net, critic, obs, num_candidates=K, steps=2, noise=x0, backend="torch")
    assert fc.get_total_flops() == F.act_cost(net, critic, B, K, 2, "euler")[0]


def test_roofline_fractions():
    r = F.roofline(flops=2e9, nbytes=1e9, seconds=0.5, peak_flops=8e9, peak_bw=4e9)
    assert r["gflops"] == pytest.approx(4.0) and r["gbps"] == pytest.approx(2.0)
    assert r["frac_flops"] == pytest.approx(0.5) and r["frac_bw"] == pytest.approx(0.5)
    assert r["intensity"] == pytest.approx(2.0)
    assert F.roofline(1, 1, 1.0, None, None)["frac_flops"] is None
    with pytest.raises(ValueError, match="seconds"):
        F.roofline(1, 1, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="solver"):
        F.evaluations("nope", 3)


# ----------------------------------------------------------------------------- report
def _bench(op, case, variant, median, base=False, sweeps=("B",), params=None, rows=64):
    return {
        "name": f"test_{op}[{case}-{variant}]", "group": f"{op}[{case}]",
        "extra_info": {"op": op, "variant": variant, "case": case, "sweeps": list(sweeps), "base": base,
                       "params": params or {"B": rows, "dtype": "float32"}, "rows": rows, "flops": 1000,
                       "bytes": 400, "peak_mem_bytes": 2 ** 20, "peak_mem_method": "test"},
        "stats": {"median": median, "iqr": 0.0, "rounds": 5, "mean": median, "min": median},
    }


def _fake_run(path):
    data = {
        "machine_info": {"qipo": {"device": "cpu", "device_name": "Test CPU", "date": "2026-01-01", "torch": "x",
                                  "peaks": {"matmul_flops[float32]": 1e9, "copy_bw": 1e9}, "note": "fabricated"}},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _bench("integrate", "B64", "torch", 2.0e-3, base=True, sweeps=("B", "steps"), params={"B": 64, "steps": 8, "dtype": "float32"}),
            _bench("integrate", "B64", "cpp", 0.5e-3, base=True, sweeps=("B", "steps"), params={"B": 64, "steps": 8, "dtype": "float32"}),
            _bench("integrate", "B256", "torch", 8.0e-3, params={"B": 256, "steps": 8, "dtype": "float32"}, rows=256),
            _bench("integrate", "B256", "cpp", 1.0e-3, params={"B": 256, "steps": 8, "dtype": "float32"}, rows=256),
            _bench("integrate", "s1", "torch", 1.0e-3, sweeps=("steps",), params={"B": 64, "steps": 1, "dtype": "float32"}),
            _bench("weighted_fm_loss", "B32", "torch", 3.0e-4, base=True),
            _bench("weighted_fm_loss", "B32", "torch.compile", 6.0e-4, base=True),
        ],
    }
    with open(path, "w") as fh:
        json.dump(data, fh)


def test_report_ratios_from_fabricated_results(tmp_path):
    f = tmp_path / "run.json"
    _fake_run(f)
    run = R.load(str(f))
    g = R.ratios(run["rows"])
    assert g[("integrate", "B64")]["cpp"]["speedup"] == pytest.approx(4.0)
    assert g[("integrate", "B256")]["cpp"]["speedup"] == pytest.approx(8.0)
    assert g[("integrate", "B64")]["torch"]["speedup"] == pytest.approx(1.0)
    assert g[("weighted_fm_loss", "B32")]["torch.compile"]["speedup"] == pytest.approx(0.5)
    md = R.markdown(run)
    assert "| `B64` (base) | 2.00 ms | 500.0 us (4.00x) |" in md
    assert "1.00 ms (8.00x)" in md
    assert "600.0 us (0.50x)" in md
    # roofline: 1000 FLOP in 2 ms = 5e5 FLOP/s = 0.05 % of the 1e9 peak
    assert "| `B64` | torch | 1e-06 | 0.0004 | 2.5 | 0.0005 | 0.05 |" in md
    out = tmp_path / "out"
    try:
        import matplotlib  # noqa: F401  (the bench extra; tables are checked without it)
        plots = True
    except ImportError:
        plots = False
    paths = R.build_report([str(f)], out_dir=str(out), make_plots=plots)
    names = {os.path.basename(p) for p in paths}
    assert {"report.md", "SUMMARY.md"} <= names
    if plots:
        assert {"speed_vs_batch.png", "latency_vs_steps.png", "speedup.png"} <= names
    for p in paths:
        if p.endswith(".png"):
            with open(p, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (out / "SUMMARY.md").read_text()
    assert "4.00x" in summary and "0.50x" in summary and "Test CPU" in summary
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_report_rejects_bad_input(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="pytest-benchmark"):
        R.load(str(bad))
    assert R.main([str(tmp_path / "missing.json")]) == 2


# ----------------------------------------------------------------------------- speed-accuracy errors
def test_errors_on_linear_field_with_known_solution():
    """dx/dt = a x: x(1) = e^a x0; Euler with n steps gives (1 + a/n)^n x0, rk4 the degree-4 Taylor factor."""
    a = -1.3
    net = lambda x, t, obs: a * x  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(40, 3, generator=g, dtype=torch.float64)
    obs = torch.zeros(40, 1, dtype=torch.float64)
    ref, self_err = SA.reference_solution(net, x0, obs, "velocity", 256)
    assert torch.allclose(ref, math.exp(a) * x0, atol=1e-10, rtol=0)
    assert self_err < 1e-10
    norm = float(x0.norm(dim=-1).mean())
    steps = [1, 2, 4, 8]
    errs = SA.solver_errors(net, x0, obs, ref, ["euler", "rk4"], steps)
    for n, e in zip(steps, errs["euler"]):
        assert e == pytest.approx(abs((1 + a / n) ** n - math.exp(a)) * norm, rel=1e-8)
    for n, e in zip(steps, errs["rk4"]):
        h = a / n
        assert e == pytest.approx(abs((1 + h + h * h / 2 + h ** 3 / 6 + h ** 4 / 24) ** n - math.exp(a)) * norm,
                                  rel=1e-6)
    assert SA.solution_error(x0, x0 + torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0)


def test_noise_model_reference_is_the_probability_flow_ode():
    """A point mass at 0: eps(x, t) = x / sigma(t), the PF-ODE solution is x(t) = sigma(t) / sigma(t0) x0,
    and DDIM (exact for this model) agrees with the rk4 reference to float64 precision."""
    def eps(x, t, obs):
        _, s = alpha_sigma(t.to(torch.float64), "vp")
        return x / s.to(x.dtype)[:, None]
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 2, generator=g, dtype=torch.float64)
    obs = torch.zeros(16, 1, dtype=torch.float64)
    ref, _ = SA.reference_solution(eps, x0, obs, "noise", 512, "vp")
    _, s0 = alpha_sigma(torch.tensor(0.0, dtype=torch.float64), "vp")
    _, s1 = alpha_sigma(torch.tensor(1.0 - 1e-3, dtype=torch.float64), "vp")
    assert torch.allclose(ref, float(s1 / s0) * x0, atol=1e-8, rtol=0)
    errs = SA.solver_errors(eps, x0, obs, ref, ["ddim"], [1, 4], path="vp")
    assert max(errs["ddim"]) < 1e-8


def test_pareto_front_and_mmd():
    pts = [(1.0, 5.0, "a"), (2.0, 1.0, "b"), (3.0, 2.0, "c"), (0.5, 9.0, "d"), (4.0, 0.5, "e")]
    assert [p[2] for p in SA.pareto(pts)] == ["d", "a", "b", "e"]
    g = torch.Generator().manual_seed(0)
    # action-scale samples (the kernel bandwidths are 0.05 .. 0.5)
    x, y = 0.2 * torch.randn(200, 2, generator=g), 0.2 * torch.randn(200, 2, generator=g)
    assert abs(SA.mmd2(x, y)) < 0.05
    assert SA.mmd2(x, y + 0.3) > 0.5


def test_synthetic_task_shapes_and_value():
    g = torch.Generator().manual_seed(0)
    obs = SA.sample_obs(50, g)
    a = SA.sample_actions(obs, g)
    assert a.shape == (50, 2) and float(a.abs().max()) <= 1.0
    assert torch.allclose(SA.mode_probs(obs).sum(1), torch.ones(50))
    assert float(SA.analytic_q(obs, SA.mode_centers(obs)[:, 0]).abs().max()) == 0.0


# ----------------------------------------------------------------------------- the benchmark grid itself
def test_every_op_case_runs_on_tiny_inputs():
    from bench import cases as C
    from bench._common import Skip, build_call, peak_memory

    dev = torch.device("cpu")
    tiny = [
        dict(op="integrate", B=2, K=3, A=6, S=17, hidden=8, depth=2, solver="dpm2", steps=2, dtype="float32"),
        dict(op="consistency_sample", B=2, K=3, A=6, S=17, hidden=8, depth=2, n_steps=3, dtype="float32"),
        dict(op="act", B=2, K=3, A=6, S=17, hidden=8, depth=2, sampler="flow", steps=2, dtype="float32"),
        dict(op="select_action", B=5, K=3, D=6, mode="softmax", dtype="float32"),
        dict(op="weighted_fm_loss", B=3, M=4, D=6, normalize="batch", pass_="fwd+bwd", dtype="float32"),
        dict(op="flow_matching_loss", B=3, M=4, D=6, normalize="support", pass_="fwd+bwd", dtype="float32", path="vp"),
        dict(op="flow_path", B=3, M=4, D=6, path="vp", dtype="float32"),
    ]
    for c in tiny:
        c.update(sweeps=["B"], base=False)
        p = C.prepare(c, dev)
        call = build_call("torch", c["op"], p["run"], p["args"], dev, p["reasons"], p["backward"])
        out = call()
        for o in (out if isinstance(out, tuple) else (out,)):
            assert torch.isfinite(o).all()
        assert p["extra"]["flops"] > 0 and p["extra"]["bytes"] > 0
        with pytest.raises(Skip, match="CUDA"):
            build_call("cudagraph", c["op"], p["run"], p["args"], dev, p["reasons"], p["backward"])
        with pytest.raises(Skip, match="compile"):
            build_call("torch.compile", c["op"], p["run"], p["args"], dev, p["reasons"], p["backward"],
                       compile_ok=False)
    mem, how = peak_memory(lambda: torch.ones(1 << 22), dev)
    assert how and (mem is None or mem >= 0)
    grid = C.integrate_cases() + C.loss_cases("weighted_fm_loss")
    assert sum(c["base"] for c in grid) == 2 and len({C.case_id(c) for c in grid}) == len(grid)


def test_project_test_run_does_not_collect_bench():
    """`python -m pytest` must not run the benchmarks: pyproject's testpaths is tests/ only."""
    import re

    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        text = fh.read()
    assert re.search(r'^testpaths\s*=\s*\["tests"\]\s*$', text, re.M)


def test_pytest_bench_save_writes_results_atomically(tmp_path):
    """End to end: `pytest bench/ --benchmark-only --bench-save` on one small case writes a complete
    JSON under <results>/<device>/ (no temp file left), and bench.report turns it into a table."""
    import subprocess

    env = dict(os.environ, QIPO_BENCH_RESULTS=str(tmp_path), QIPO_BENCH_BUDGET="0.02", QIPO_BENCH_DEVICE="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "bench", "test_bench_sampler.py"), "--benchmark-only",
           "-q", "-p", "no:cacheprovider", "--bench-save", "--bench-tag", "t", "--bench-note", "unit test",
           "-k", "test_select_action and B64-K50-D6-argmax-float32"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len([f for f in files if f.endswith("-t.json")]) == 1, files
    assert not [f for f in files if f.endswith(".tmp")]
    data = json.load(open([f for f in files if f.endswith("-t.json")][0]))
    assert data["machine_info"]["qipo"]["note"] == "unit test"
    assert data["machine_info"]["qipo"]["peaks"]["copy_bw"] > 0
    rows = [b["extra_info"] for b in data["benchmarks"]]
    assert "torch" in [x["variant"] for x in rows] and {x["op"] for x in rows} == {"select_action"}
    paths = R.build_report([str(tmp_path)], make_plots=False)
    assert any(p.endswith("report.md") for p in paths)


def test_report_without_matplotlib_writes_the_tables(tmp_path, monkeypatch, capsys):
    f = tmp_path / "run.json"
    _fake_run(f)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert R.main([str(f), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "500.0 us (4.00x)" in md and "Plots skipped: matplotlib is not installed" in md
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".png")]
    assert "without plots" in capsys.readouterr().err


def test_point_labels_do_not_overlap():
    """Labels of points that sit on top of each other (as in return_vs_time.png) are spread apart."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench._common import place_labels

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [1.0, 1.0, 1.01, 1.02, 2.0, 2.0, 2.0, 3.0] * 2
    ys = [5.0, 5.0, 5.02, 5.0, 1.0, 1.01, 1.0, 3.0] + [5.0, 5.01, 5.0, 5.02, 1.0, 1.0, 1.02, 3.0]
    ax.plot(xs, ys, "o")
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 6)
    fig.tight_layout()
    place_labels(ax, list(zip(xs, ys)), [f"rk4-{i}" for i in range(len(xs))])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, r) for t in ax.texts]   # the label, without its leader line
    assert len(boxes) == len(xs)
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    plt.close(fig)


def test_bench_train_step_compile_table(tmp_path, monkeypatch):
    """--compare compile end to end on small batches: three variants per stage, every time positive, the
    compiled trainers compiled the way --set compile=true does (Trainer.compile_networks)."""
    seen = []
    orig = TS._compiled
    monkeypatch.setattr(TS, "_compiled", lambda tr: seen.append(orig(tr)) or seen[-1])
    from qipo_kernels.algos.qipo import QIPO_PRESETS

    monkeypatch.setitem(QIPO_PRESETS, "tiny-batches", {"pretrain_batch": 64, "q_batch": 8, "policy_batch": 8})
    out = str(tmp_path / "ts.md")
    TS.main(["--compare", "compile", "--batch-preset", "tiny-batches", "--steps", "1", "--rounds", "1", "--out", out])
    rows = [ln for ln in open(out).read().splitlines() if ln.startswith("| qipo") or ln.startswith("| cpql")]
    assert len(rows) == 4 and "qipo stage 1 (batch 64)" in rows[0]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c.rstrip("x")) > 0 for c in cells[1:])
    assert len(seen) == 4
    for tr in seen:
        for name in tr.optims:
            m = tr.modules[name]
            assert getattr(getattr(m, "net", m), "_qipo_compiled", False) or getattr(m, "_qipo_compiled", False)


# ----------------------------------------------------------------------------- the CPU model name
def test_cpu_model_one_reading(monkeypatch):
    """Datasets' stamps and the benchmarks' result files name the CPU through one function: the
    "model name" line of /proc/cpuinfo, else the platform's name for the processor."""
    import builtins
    import io
    import platform

    from bench import _common, bench_cpu
    from qipo_kernels.data import rollout

    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            return io.StringIO("processor\t: 0\nvendor_id\t: Acme\nmodel name\t: Acme Widget 9000 @ 1.0GHz\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert rollout.cpu_model() == "Acme Widget 9000 @ 1.0GHz"
    assert _common.cpu_model() == bench_cpu.cpu_name() == "Acme Widget 9000 @ 1.0GHz"
    assert rollout.software_stamp().endswith("; cpu Acme Widget 9000 @ 1.0GHz")

    def no_cpuinfo(path, *a, **k):
        if path == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert rollout.cpu_model() == _common.cpu_model() == bench_cpu.cpu_name() == "riscv64"
