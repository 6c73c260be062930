"""Shared machinery of the micro-benchmarks: device naming, peaks, variants, timing, memory.

A *variant* is how an op is run:
    "torch"          the plain-PyTorch reference, eager (ops.X(..., backend="torch"))
    "torch.compile"  torch.compile of that reference call (dynamic=False; compile time excluded)
    "cudagraph"      the reference captured once in a CUDA graph and replayed (GPU only)
    "triton", "cpp"  ops.X(..., backend=...) when qipo_kernels.backends says it can run here
Every variant of one case is timed in the same run; the report divides by the "torch" time.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

VARIANTS = ("torch", "torch.compile", "cudagraph", "triton", "cpp")
# QIPO_BENCH_RESULTS moves the results tree (e.g. to a scratch directory); default bench/results.
RESULTS_DIR = os.environ.get("QIPO_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- formatting
def pm(mean: float, se: Optional[float], digits: int = 1) -> str:
    """"mean ± se"; an s.e. that cannot be measured (one episode: nan in memory, null after a JSON round
    trip) reads "mean ± -" instead of failing or printing "nan"."""
    se_txt = "-" if se is None or se != se else f"{se:.{digits}f}"
    return f"{mean:.{digits}f} ± {se_txt}"


def score_text(s: Dict, digits: int = 1) -> str:
    """pm of an evaluation summary {"normalized": mean, "se": standard error or None}."""
    return pm(s["normalized"], s.get("se"), digits)


# ----------------------------------------------------------------------------- device
def cpu_model() -> str:
    """CPU model name (qipo_kernels.data.rollout.cpu_model: /proc/cpuinfo, else platform)."""
    from qipo_kernels.data.rollout import cpu_model as _cpu_model

    return _cpu_model()


def device_name(device: torch.device) -> str:
    """Human name of the device the benchmarks ran on (GPU name, or CPU model)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(name: str) -> str:
    """A directory name for a device: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3'."""
    s = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")
    return s or "unknown"


def results_dir(device: torch.device) -> str:
    return os.path.join(RESULTS_DIR, slug(device_name(device)))


def bench_device() -> torch.device:
    """cuda when available unless QIPO_BENCH_DEVICE says otherwise."""
    want = os.environ.get("QIPO_BENCH_DEVICE", "")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


# ----------------------------------------------------------------------------- peaks
def _median_time(fn: Callable[[], object], device, reps: int) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def measure_peaks(device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> Dict[str, float]:
    """Measured (not datasheet) peaks on ``device``, for the roofline fractions.

    matmul_flops[<dtype>]: FLOP/s of a large square matmul (n = 8192 on GPU, 1024 on CPU);
    copy_bw: bytes/s of a large tensor copy (1 GiB on GPU, 128 MiB on CPU), read + write counted.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    out: Dict[str, float] = {}
    for dt in dtypes or ((torch.float32, torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.float64)):
        try:
            a = torch.randn(n, n, device=device).to(dt)
            b = torch.randn(n, n, device=device).to(dt)
            t = _median_time(lambda: a @ b, device, 10 if gpu else 3)
            out[f"matmul_flops[{str(dt).replace('torch.', '')}]"] = 2.0 * n ** 3 / t
            del a, b
        except RuntimeError:  # a dtype without matmul support here
            continue
    nbytes = (1 << 30) if gpu else (128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device, 10 if gpu else 3)
    out["copy_bw"] = 2.0 * nbytes / t
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- memory
def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_memory(call: Callable[[], object], device: torch.device):
    """(bytes, method): extra memory at the peak of one call.

    GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats, minus what was allocated
    before the call (exact for the caching allocator's tensors).
    CPU: the rise of the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over the resident set before the call, after glibc's malloc_trim has
    returned free heap pages: approximate (page granularity; pages the allocator still holds hide
    part of it) and Linux only; (None, reason) elsewhere. tracemalloc is not used: it does not see
    torch's CPU allocator.
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda.max_memory_allocated"
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None, "unavailable (needs Linux /proc/self/clear_refs)"
    base = _proc_status("VmRSS:")
    call()
    hwm = _proc_status("VmHWM:")
    if base is None or hwm is None:
        return None, "unavailable (no VmRSS/VmHWM)"
    return max(int(hwm - base), 0), "RSS high-water mark after malloc_trim (approx.)"


# ----------------------------------------------------------------------------- variants
class Skip(Exception):
    """This variant cannot run this case here; the message says why."""


def build_call(variant: str, op: str, run: Callable[..., object], args: tuple, device: torch.device,
               reasons: Callable[[str], List[str]], backward: Optional[Callable[[object, tuple], None]] = None,
               compile_ok: bool = True) -> Callable[[], object]:
    """A zero-argument callable doing one call of ``op`` the ``variant`` way.

    run(backend, *args) -> output: calls the public op with ``backend=``.
    reasons(backend) -> list of reasons the backend cannot run this call (qipo_kernels.backends).
    backward(out, args): optional; done after the forward in the same timed call (loss fwd+bwd).
    Raises Skip with the reason when the variant is unavailable.
    """
    device = torch.device(device)

    def with_backward(fwd):
        if backward is None:
            return fwd

        def call():
            out = fwd()
            backward(out, args)
            return out
        return call

    if variant == "torch":
        return with_backward(lambda: run("torch", *args))
    if variant in ("triton", "cpp"):
        if variant == "triton" and device.type != "cuda" and os.environ.get("QIPO_BENCH_TRITON_INTERPRET") != "1":
            raise Skip("triton: on a CPU the kernels only run in the Triton interpreter, a correctness tool "
                       "whose timings mean nothing (QIPO_BENCH_TRITON_INTERPRET=1 times it anyway)")
        why = reasons(variant)
        if why:
            raise Skip(f"{variant}: " + "; ".join(why))
        return with_backward(lambda: run(variant, *args))
    if variant == "torch.compile":
        if not compile_ok:
            raise Skip("torch.compile is run on the base case of each op only in this grid "
                       "(QIPO_BENCH_COMPILE=all compiles every case)")
        if os.environ.get("QIPO_BENCH_COMPILE", "") == "none":
            raise Skip("QIPO_BENCH_COMPILE=none")

        def ref(*a):
            return run("torch", *a)
        compiled = torch.compile(ref, dynamic=False)
        return with_backward(lambda: compiled(*args))
    if variant == "cudagraph":
        if device.type != "cuda":
            raise Skip("CUDA graphs need a CUDA device")
        return _cuda_graph_call(lambda: run("torch", *args), args, backward, device)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _clear_grads(args: tuple) -> None:
    for a in args:
        if torch.is_tensor(a) and a.requires_grad:
            a.grad = None


def _cuda_graph_call(fwd: Callable[[], object], args: tuple, backward, device) -> Callable[[], object]:
    """Capture fwd (and backward) of the reference once on static inputs; the call replays the graph.

    Warm-up runs on a side stream first (required before capture). Gradients are set to None
    before capture so that backward allocates them inside the graph's pool and each replay
    overwrites them (no accumulation across replays).
    """
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            out = fwd()
            if backward is not None:
                backward(out, args)
                _clear_grads(args)
    torch.cuda.current_stream(device).wait_stream(s)
    _clear_grads(args)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            out = fwd()
            if backward is not None:
                backward(out, args)
    except RuntimeError as e:  # e.g. a host sync inside the op: it cannot be captured
        raise Skip(f"the reference cannot be captured in a CUDA graph: {e}") from e

    def replay():
        g.replay()
        return out
    replay.graph = g  # keep it alive
    return replay


# ----------------------------------------------------------------------------- timing
def budget_s() -> float:
    """Seconds of timed calls per benchmark (QIPO_BENCH_BUDGET; default 0.25 on CPU, 0.5 on GPU)."""
    v = os.environ.get("QIPO_BENCH_BUDGET")
    if v:
        return float(v)
    return 0.5 if bench_device().type == "cuda" else 0.25


def timed(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """The function pytest-benchmark times: one call, synchronised inside on a GPU, so the
    measured wall time is the time the device took (kernel launches are asynchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        def fn():
            out = call()
            torch.cuda.synchronize(device)
            return out
        return fn
    return call


def rounds_for(fn: Callable[[], object], budget: float, min_rounds: int = 3, max_rounds: int = 200) -> int:
    """How many timed rounds fit in ``budget`` seconds, from one probe call."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_rounds, max(min_rounds, budget / dt)))


# ----------------------------------------------------------------------------- atomic outputs
def atomic_write(path: str, text: str) -> None:
    """Write text to path via a temp file in the same folder and a rename (never half-written)."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_savefig(fig, path: str) -> None:
    """fig.savefig as PNG via a temp file and a rename."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_study(res: Dict, out_dir: str, md_name: str, markdown: Callable[[Dict], str],
               plots: Optional[Callable[[Dict, str], List[str]]] = None) -> List[str]:
    """results.json, <md_name> and (plots given) the PNGs of a study, written atomically to out_dir."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, md_name)]
    atomic_write(written[0], json.dumps(res, indent=1))
    atomic_write(written[1], markdown(res))
    if plots is not None:
        written += plots(res, out_dir)
    return written


def replot(results_json: str, out_dir: Optional[str], save: Callable[[Dict, str], List[str]]) -> int:
    """--replot of a study: redraw the Markdown and plots from a saved results.json (next to it by default)."""
    import json

    with open(results_json) as fh:
        res = json.load(fh)
    for p in save(res, out_dir or os.path.dirname(os.path.abspath(results_json))):
        print(p)
    return 0


# ----------------------------------------------------------------------------- plot labels
def place_labels(ax, points: Sequence, labels: Sequence[str], colors: Optional[Sequence] = None,
                 fontsize: float = 7) -> None:
    """Annotate ``points`` [(x, y) in data units] with ``labels`` so that no two labels overlap and no label
    covers a marker: each label takes the nearest free spot around its point (searched on rings of growing
    radius, in display space), with a thin leader line when it had to move away. Call it after the axes'
    scales, limits and the figure layout (tight_layout) are final."""
    import math

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_pt = 72.0 / fig.dpi
    disp = [tuple(ax.transData.transform((x, y))) for x, y in points]
    frame = ax.get_window_extent(renderer)
    r0 = 4.0 * fig.dpi / 72.0
    taken = [(px - r0, py - r0, px + r0, py + r0) for px, py in disp]   # the labelled markers
    step = 5.0 * fig.dpi / 72.0
    r1 = 2.5 * fig.dpi / 72.0
    for line in ax.get_lines():   # every other marker and line: a label goes to empty space
        xy = line.get_xydata()
        if len(xy) == 0:
            continue
        try:
            d = line.get_transform().transform(xy)
        except ValueError:
            continue
        for (x0, y0), (x1, y1) in zip(d[:-1], d[1:]) if len(d) > 1 else []:
            if not all(map(math.isfinite, (x0, y0, x1, y1))):
                continue
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
            if n > 400:   # a long straight segment (an axhline, a front's step): its ends and a few points
                n = 400
            taken += [(x0 + (x1 - x0) * j / n - r1, y0 + (y1 - y0) * j / n - r1,
                       x0 + (x1 - x0) * j / n + r1, y0 + (y1 - y0) * j / n + r1) for j in range(n + 1)]
        if len(d) == 1 and all(map(math.isfinite, d[0])):
            taken.append((d[0][0] - r0, d[0][1] - r0, d[0][0] + r0, d[0][1] + r0))
    if ax.get_legend() is not None:
        lb = ax.get_legend().get_window_extent(renderer)
        taken.append((lb.x0, lb.y0, lb.x1, lb.y1))

    def free(b):
        if b[0] < frame.x0 or b[2] > frame.x1 or b[1] < frame.y0 or b[3] > frame.y1:
            return False
        return all(b[2] <= o[0] or b[0] >= o[2] or b[3] <= o[1] or b[1] >= o[3] for o in taken)

    order = sorted(range(len(points)), key=lambda i: (disp[i][0], disp[i][1]))
    for i in order:
        px, py = disp[i]
        t = ax.text(0, 0, labels[i], fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        w, h = bb.width + 2, bb.height + 1
        best = None
        for radius in (3, 8, 14, 22, 32, 45, 60, 80):
            rad = radius * fig.dpi / 72.0
            for k in range(16):
                a = math.pi / 4 + 2 * math.pi * k / 16   # up-right first
                dx, dy = rad * math.cos(a), rad * math.sin(a)
                cx = px + dx + (w / 2 if dx > 1e-6 else -w / 2 if dx < -1e-6 else 0.0)
                cy = py + dy + (h / 2 if dy > 1e-6 else -h / 2 if dy < -1e-6 else 0.0)
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                if free(box):
                    best = (box, cx - px, cy - py, radius)
                    break
            if best:
                break
        if best is None:  # nowhere free: up-right, overlapping as little as the first ring allows
            box = (px + r0, py + r0, px + r0 + w, py + r0 + h)
            best = (box, r0 + w / 2, r0 + h / 2, 3)
        box, ox, oy, radius = best
        taken.append(box)
        col = colors[i] if colors is not None else "black"
        ax.annotate(labels[i], points[i], xytext=(ox * to_pt, oy * to_pt), textcoords="offset points",
                    ha="center", va="center", fontsize=fontsize, color=col,
                    arrowprops=dict(arrowstyle="-", lw=0.7, color=col, alpha=0.9, shrinkA=0, shrinkB=2)
                    if radius > 8 else None)
