"""Turn micro-benchmark result files into Markdown tables and PNG plots.

    python -m bench.report                       # every device under bench/results/ (newest run each)
    python -m bench.report FILE.json [...]       # given result files (written next to each file)
    python -m bench.report --out DIR FILE.json   # written to DIR
    qipo-kernels bench --report                  # the same (calls bench.report.main)

For each result file (one pytest-benchmark run: every ratio compares timings from the same run on the
same device) it writes, in the output directory:
    report.md            per op: median time of the reference ("torch") and, for every other
                         variant, its time and speedup = t_torch / t_variant (> 1 is faster);
                         peak memory; a roofline table (achieved GFLOP/s and GB/s, fraction of the
                         matmul / copy peaks measured in the same run)
    speed_vs_batch.png   throughput (rows/s) against batch rows, one line per variant, per op
    latency_vs_steps.png integrate latency against solver steps (and consistency steps), per variant
    speedup.png          speedup of each variant over the reference on each op's base case
and bench/results/SUMMARY.md, a short Markdown summary (base case of each op, every device)
suitable for the README.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from ._common import RESULTS_DIR, VARIANTS, atomic_savefig, atomic_write

OP_ORDER = ("integrate", "consistency_sample", "act", "select_action", "weighted_fm_loss", "flow_matching_loss",
            "flow_path")


# ----------------------------------------------------------------------------- loading
def load(path: str) -> Dict:
    """One pytest-benchmark JSON file -> dict(machine=..., rows=[...]) with one row per benchmark."""
    with open(path) as fh:
        data = json.load(fh)
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    machine = data.get("machine_info", {}).get("qipo", {})
    rows = []
    for b in data["benchmarks"]:
        ex = b.get("extra_info", {})
        if "op" not in ex or "variant" not in ex:
            continue  # not one of ours
        st = b["stats"]
        rows.append(dict(
            op=ex["op"], variant=ex["variant"], case=ex["case"], params=ex.get("params", {}),
            sweeps=ex.get("sweeps", []), base=bool(ex.get("base", False)), median=float(st["median"]),
            iqr=float(st.get("iqr", 0.0)), rounds=int(st.get("rounds", 0)), rows=ex.get("rows"),
            flops=ex.get("flops"), bytes=ex.get("bytes"), peak_mem=ex.get("peak_mem_bytes"),
            peak_mem_method=ex.get("peak_mem_method", ""),
        ))
    return dict(path=path, machine=machine, rows=rows, datetime=data.get("datetime", ""))


def ratios(rows: List[Dict]) -> Dict[tuple, Dict[str, Dict]]:
    """{(op, case): {variant: row + 'speedup'}}: speedup = median(torch) / median(variant), same run."""
    out: Dict[tuple, Dict[str, Dict]] = OrderedDict()
    for r in rows:
        out.setdefault((r["op"], r["case"]), {})[r["variant"]] = dict(r)
    for key, vs in out.items():
        ref = vs.get("torch")
        for v, r in vs.items():
            r["speedup"] = (ref["median"] / r["median"]) if ref and r["median"] > 0 else None
    return out


# ----------------------------------------------------------------------------- formatting
def _t(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.1f}"


def _variants_present(groups) -> List[str]:
    seen = {v for vs in groups.values() for v in vs}
    return [v for v in VARIANTS if v in seen]


def _sort_key(op_case):
    op, _ = op_case
    return OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)


def _peak_for(machine: Dict, dtype: str) -> Optional[float]:
    return machine.get("peaks", {}).get(f"matmul_flops[{dtype}]")


PLOT_FILES = ("speed_vs_batch.png", "latency_vs_steps.png", "speedup.png")


def markdown(run: Dict, images: Sequence[str] = PLOT_FILES) -> str:
    """The full Markdown report of one run (``images``: the plot files to link)."""
    from .flops import roofline

    m = run["machine"]
    groups = ratios(run["rows"])
    variants = _variants_present(groups)
    lines = [f"# Benchmarks on {m.get('device_name', '?')} ({m.get('device', '?')}), {m.get('date', '?')}", ""]
    lines.append(f"- torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, Python {m.get('python')}; "
                 f"{m.get('cpu_count')} CPU cores visible, torch threads {m.get('torch_threads')}; "
                 f"grid `{m.get('grid')}`, torch.compile on `{m.get('compile')}` cases")
    if m.get("note"):
        lines.append(f"- Note: {m['note']}")
    pk = m.get("peaks", {})
    if pk:
        lines.append("- Peaks measured in this run: " + ", ".join(
            f"{k} {v / 1e12:.2f} TFLOP/s" if k.startswith("matmul") else f"{k} {v / 1e9:.1f} GB/s"
            for k, v in pk.items()))
    lines.append(f"- Source: `{os.path.relpath(run['path'])}`; speedup = median time of the reference (`torch`, "
                 "eager) / median time of the variant, both from this run (> 1 is faster).")
    absent = [v for v in VARIANTS if v not in variants]
    if absent:
        lines.append(f"- Not in this run (unavailable here, see the skip reasons of the run): {', '.join(absent)}")
    lines.append("")
    ops_seen = []
    for key in sorted(groups, key=_sort_key):
        if key[0] not in ops_seen:
            ops_seen.append(key[0])
    for op in ops_seen:
        keys = [k for k in groups if k[0] == op]
        lines += [f"## {op}", ""]
        op_variants = [v for v in variants if any(v in groups[k] for k in keys)]
        others = [v for v in op_variants if v != "torch"]
        hdr = ["case", "torch"] + [f"{v} (speedup)" for v in others]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        for k in keys:
            vs = groups[k]
            cells = [f"`{k[1]}`" + (" (base)" if any(r["base"] for r in vs.values()) else ""),
                     _t(vs["torch"]["median"]) if "torch" in vs else "-"]
            for v in others:
                r = vs.get(v)
                if r is None:
                    cells.append("-")
                elif r["speedup"] is None:
                    cells.append(_t(r["median"]))
                else:
                    cells.append(f"{_t(r['median'])} ({r['speedup']:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        # memory
        method = next((r["peak_mem_method"] for k in keys for r in groups[k].values() if r.get("peak_mem_method")), "")
        lines.append(f"Peak memory per call, MiB ({method}):")
        lines.append("")
        hdr = ["case"] + op_variants
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        for k in keys:
            vs = groups[k]
            lines.append("| " + " | ".join([f"`{k[1]}`"] + [_mib(vs[v]["peak_mem"]) if v in vs else "-"
                                                            for v in op_variants]) + " |")
        lines.append("")
        # roofline
        lines.append("Roofline (compulsory FLOPs and bytes per call, see bench/flops.py; fractions of the peaks above, "
                     "which are what torch's matmul / copy reach in this run, not datasheet numbers, so a fused "
                     "kernel can exceed 100 %):")
        lines.append("")
        lines.append("| case | variant | GFLOP/call | MB/call | FLOP/byte | GFLOP/s | % matmul peak | GB/s | % copy peak |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for k in keys:
            for v in op_variants:
                r = groups[k].get(v)
                if r is None or not r.get("flops") or not r.get("bytes"):
                    continue
                dtype = r["params"].get("dtype", "float32")
                rl = roofline(r["flops"], r["bytes"], r["median"], _peak_for(m, dtype), pk.get("copy_bw"))
                pct = (lambda x: "-" if x is None else f"{100 * x:.2f}")
                lines.append(f"| `{k[1]}` | {v} | {r['flops'] / 1e9:.4g} | {r['bytes'] / 1e6:.4g} | "
                             f"{rl['intensity']:.3g} | {rl['gflops']:.3g} | {pct(rl['frac_flops'])} | "
                             f"{rl['gbps']:.3g} | {pct(rl['frac_bw'])} |")
        lines.append("")
    if images:
        lines += ["## Plots", ""]
        for im in images:
            lines += [f"![{im[:-4].replace('_', ' ')}]({im})", ""]
    return "\n".join(lines)


def summary_lines(run: Dict, rel_dir: str) -> List[str]:
    """A short README block for one run: the base case of every op, each variant's time and speedup."""
    m = run["machine"]
    groups = ratios(run["rows"])
    variants = _variants_present(groups)
    others = [v for v in variants if v != "torch"]
    out = [f"**{m.get('device_name', '?')}** ({m.get('device')}, {m.get('date')}, torch {m.get('torch')}, "
           f"{m.get('torch_threads')} thread(s)){' - ' + m['note'] if m.get('note') else ''}", ""]
    hdr = ["op (base case)", "torch"] + others
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for key in sorted(groups, key=_sort_key):
        vs = groups[key]
        if not any(r["base"] for r in vs.values()):
            continue
        cells = [f"{key[0]} `{key[1]}`", _t(vs["torch"]["median"]) if "torch" in vs else "-"]
        for v in others:
            r = vs.get(v)
            cells.append("-" if r is None else (f"{r['speedup']:.2f}x" if r["speedup"] else _t(r["median"])))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Full tables, memory, roofline and plots: [{rel_dir}/report.md]({rel_dir}/report.md)", ""]
    return out


# ----------------------------------------------------------------------------- plots
def _sweep_series(rows: List[Dict], op: str, axis: str):
    """{variant: sorted [(x, row)]} of the rows of one op's sweep over ``axis``."""
    series: Dict[str, List] = {}
    for r in rows:
        if r["op"] == op and axis in r["sweeps"]:
            series.setdefault(r["variant"], []).append((r["params"][axis], r))
    return {v: sorted(s, key=lambda p: p[0]) for v, s in series.items()}


def plots(run: Dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["rows"]
    m = run["machine"]
    title = f"{m.get('device_name', '?')} ({m.get('date', '?')})"
    written = []
    colors = {v: c for v, c in zip(VARIANTS, ("black", "tab:blue", "tab:purple", "tab:red", "tab:green"))}

    ops_b = [op for op in OP_ORDER if _sweep_series(rows, op, "B")]
    if ops_b:
        n = len(ops_b)
        cols = min(3, n)
        nr = (n + cols - 1) // cols
        fig, axes = plt.subplots(nr, cols, figsize=(4.6 * cols, 3.6 * nr), squeeze=False)
        for ax, op in zip(axes.flat, ops_b):
            for v, s in _sweep_series(rows, op, "B").items():
                xs = [r["rows"] or x for x, r in s]
                ys = [(r["rows"] or x) / r["median"] for x, r in s]
                ax.plot(xs, ys, "o-", label=v, color=colors.get(v))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(op, fontsize=10)
            ax.set_xlabel("rows per call (samples or pairs)")
            ax.set_ylabel("rows / s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"Throughput vs batch - {title}", fontsize=11)
        fig.tight_layout()
        p = os.path.join(out_dir, "speed_vs_batch.png")
        atomic_savefig(fig, p)
        plt.close(fig)
        written.append(p)

    panels = [(op, ax_) for op, ax_ in (("integrate", "steps"), ("consistency_sample", "n_steps"))
              if _sweep_series(rows, op, ax_)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
        for ax, (op, axis) in zip(axes.flat, panels):
            for v, s in _sweep_series(rows, op, axis).items():
                ax.plot([x for x, _ in s], [r["median"] * 1e3 for _, r in s], "o-", label=v, color=colors.get(v))
            base = next((r for r in rows if r["op"] == op and r["base"]), None)
            if axis == "steps":
                ax.set_xscale("log", base=2)
            xs_all = sorted({x for s in _sweep_series(rows, op, axis).values() for x, _ in s})
            ax.set_xticks(xs_all)
            ax.set_xticklabels([str(x) for x in xs_all])
            ax.set_yscale("log")
            ax.set_xlabel("solver steps" if axis == "steps" else "consistency steps (denoiser calls)")
            ax.set_ylabel("latency per call (ms)")
            sub = ""
            if base is not None:
                pr = base["params"]
                sub = f"\nB={pr.get('B')} K={pr.get('K')} H={pr.get('hidden')} {pr.get('solver', '')} {pr.get('dtype')}"
            ax.set_title(op + sub, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Latency vs steps - {title}", fontsize=11)
        fig.tight_layout()
        p = os.path.join(out_dir, "latency_vs_steps.png")
        atomic_savefig(fig, p)
        plt.close(fig)
        written.append(p)

    groups = ratios(rows)
    base_keys = [k for k in sorted(groups, key=_sort_key) if any(r["base"] for r in groups[k].values())]
    variants = [v for v in _variants_present(groups)]
    if base_keys:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(base_keys) + 2), 3.8))
        w = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            ys = [groups[k][v]["speedup"] if v in groups[k] and groups[k][v]["speedup"] else np.nan for k in base_keys]
            ax.bar(np.arange(len(base_keys)) + i * w, ys, w, label=v, color=colors.get(v))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(np.arange(len(base_keys)) + w * (len(variants) - 1) / 2)
        ax.set_xticklabels([k[0] + ("\nfwd+bwd" if "fwd+bwd" in k[1] else "") for k in base_keys], fontsize=8)
        ax.set_ylabel("speedup over eager reference")
        ax.set_title(f"Base case of each op - {title}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "speedup.png")
        atomic_savefig(fig, p)
        plt.close(fig)
        written.append(p)
    return written


# ----------------------------------------------------------------------------- driver
def _is_bench_file(path: str) -> bool:
    try:
        with open(path) as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return '"benchmarks"' in head or '"machine_info"' in head


def newest_runs(results_dir: str = RESULTS_DIR) -> List[str]:
    """The newest micro-benchmark JSON of every device directory under ``results_dir``."""
    out = []
    for d in sorted(glob.glob(os.path.join(results_dir, "*"))):
        if not os.path.isdir(d):
            continue
        files = sorted((f for f in glob.glob(os.path.join(d, "*.json")) if _is_bench_file(f)),
                       key=lambda f: (os.path.basename(f)[:10], os.path.getmtime(f)))
        if files:
            out.append(files[-1])
    return out


def have_matplotlib() -> bool:
    """True when matplotlib can be imported (the plots need it; the tables do not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(inputs: Optional[Sequence[str]] = None, out_dir: Optional[str] = None,
                 summary_path: Optional[str] = None, make_plots: bool = True) -> List[str]:
    """Write report.md (+ plots) for each result file and a README summary; returns the paths written.

    inputs: result JSON files or directories (None: the newest run of every device in bench/results).
    out_dir: where to write (None: next to each input file).
    summary_path: README summary file (None: bench/results/SUMMARY.md when inputs is None, else
        <out_dir or the first input's directory>/SUMMARY.md).
    make_plots: also draw the PNGs; without matplotlib the report is tables only (with a note saying so).
    """
    files: List[str] = []
    if not inputs:
        files = newest_runs()
        if not files:
            raise FileNotFoundError(f"no benchmark result files under {RESULTS_DIR}; run "
                                    "`pytest bench/ --benchmark-only --bench-save` first")
    else:
        for p in inputs:
            if os.path.isdir(p):
                files += newest_runs(p) or [f for f in sorted(glob.glob(os.path.join(p, "*.json"))) if _is_bench_file(f)][-1:]
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise FileNotFoundError(f"no such result file or directory: {p}")
    note = ""
    if make_plots and not have_matplotlib():
        make_plots = False
        note = ("\n> Plots skipped: matplotlib is not installed here (`pip install 'qipo_kernels[bench]'`); "
                "the tables above are complete.\n")
        print("bench.report: matplotlib is not installed; writing the tables without plots", file=sys.stderr)
    written: List[str] = []
    summary = ["### Benchmark results", "",
               "Speedups are median(eager reference) / median(variant), measured in the same run on the same device.",
               ""]
    for f in files:
        run = load(f)
        od = out_dir or os.path.dirname(os.path.abspath(f))
        os.makedirs(od, exist_ok=True)
        pngs = plots(run, od) if make_plots else []
        for name in PLOT_FILES:  # a plot this run has no data for must not survive from an older run
            stale = os.path.join(od, name)
            if stale not in pngs and os.path.exists(stale):
                os.remove(stale)
        p = os.path.join(od, "report.md")
        atomic_write(p, markdown(run, [os.path.basename(q) for q in pngs]) + note)
        written += [p] + pngs
        base = os.path.dirname(os.path.abspath(summary_path)) if summary_path else (
            out_dir if out_dir else (RESULTS_DIR if not inputs else os.path.dirname(os.path.abspath(files[0]))))
        summary += summary_lines(run, os.path.relpath(od, base))
    if summary_path is None:
        summary_path = os.path.join(RESULTS_DIR if not inputs else (out_dir or os.path.dirname(os.path.abspath(files[0]))),
                                    "SUMMARY.md")
    atomic_write(summary_path, "\n".join(summary))
    written.append(summary_path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m bench.report [FILES/DIRS] [--out DIR] [--summary PATH] [--no-plots]``."""
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="result JSON files or directories (default: bench/results/*)")
    ap.add_argument("--out", default=None, help="output directory (default: next to each result file)")
    ap.add_argument("--summary", default=None, help="path of the README summary (default: SUMMARY.md)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    a = ap.parse_args(argv)
    try:
        paths = build_report(a.inputs or None, a.out, a.summary, make_plots=not a.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
