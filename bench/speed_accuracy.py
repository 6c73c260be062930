"""Speed-accuracy study: which solver, how many steps, what it costs; consistency vs flow sampling.

    python -m bench.speed_accuracy                 # full study (a few minutes on a small CPU)
    python -m bench.speed_accuracy --quick         # fewer samples / training steps (smoke run)

Models (all qipo_kernels.ConditionalMLP):
  (a) "random":  untrained, default initialisation (velocity field for euler/midpoint/heun/rk4; the
                 same architecture read as a VP noise predictor for ddim/dpm1/dpm2).
  (b) "trained": trained inside this script on a synthetic conditional multimodal task
                 (obs s ~ U[-1,1]^4; action = one of 4 Gaussian modes on a circle of radius 0.6,
                 rotated by pi*s0, mode weights set by s1, std 0.08): a velocity model with
                 ops.flow_matching_loss(path="ot") and a noise model with path="vp"; plus a
                 consistency policy trained with ops.consistency_loss on the same task.

For every model, solver and step count (1..64):
  error  = mean over samples of ||x_solver - x_ref||_2, both computed in float64 from the same noise,
           x_ref = rk4 with --ref-steps steps in float64 (for noise models: rk4 on the probability-flow
           ODE dx/dt = (a'/a) x + (s' - s a'/a) eps(x, t) over the same clipped time grid, with steps
           uniform in log-SNR, where that ODE is smooth). The
           reference's own error is estimated as ||x_ref(n) - x_ref(n/2)|| and drawn as a floor.
  time   = best of 3 wall times of one float32 call at --time-batch samples (backend --backend).
For the trained models, sample quality: MMD (RBF kernel, several bandwidths) between policy samples and
held-out samples of the true conditional distribution, averaged over test states, with the MMD of
two independent true sample sets as the noise floor; and the value of the sampled actions under the
task's known Q(s, a) = -||a - c0(s)||^2 (c0: mode 0). That Q is analytic, not a learned critic;
pass ``critic=`` to ``run_study`` to score with a learned one (a callable q(obs, act) -> [N]).
Environment return is NOT measured: the synthetic task has no environment.

Outputs in bench/results/<device>/speed_accuracy/: results.json, speed_accuracy.md and
error_vs_steps.png, error_vs_time.png (Pareto front), cost.png, quality.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from qipo_kernels import ConditionalMLP, ops
from qipo_kernels.reference.ode import NOISE_SOLVERS, STAGES, VELOCITY_SOLVERS, time_grid
from qipo_kernels.reference.paths import alpha_sigma, inverse_log_snr, log_snr

from ._common import atomic_savefig, cpu_model, device_name, place_labels, replot, results_dir, save_study, today

STEPS = (1, 2, 4, 8, 16, 32, 64)
CM_SIGMAS = {1: None, 2: [1.0], 3: [1.0, 0.3]}  # extra noise levels of 2- and 3-step consistency sampling
OBS_DIM, ACT_DIM = 4, 2


# ----------------------------------------------------------------------------- the synthetic task
def mode_centers(obs: torch.Tensor) -> torch.Tensor:
    """The 4 mode centres of each state: [N, 4, 2] on a circle of radius 0.6, rotated by pi * s0."""
    ang = math.pi * obs[:, :1] + torch.arange(4, dtype=obs.dtype, device=obs.device)[None, :] * (math.pi / 2)
    return 0.6 * torch.stack([ang.cos(), ang.sin()], dim=-1)


def mode_probs(obs: torch.Tensor) -> torch.Tensor:
    """Mode weights [N, 4]: softmax(2 * s1 * [1, -1, 0.5, -0.5])."""
    w = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=obs.dtype, device=obs.device)
    return torch.softmax(2.0 * obs[:, 1:2] * w[None, :], dim=1)


def sample_actions(obs: torch.Tensor, generator: Optional[torch.Generator] = None, std: float = 0.08) -> torch.Tensor:
    """One action per state from the true conditional distribution: [N, S] -> [N, 2], in [-1, 1]."""
    k = torch.multinomial(mode_probs(obs), 1, generator=generator)[:, 0]
    c = mode_centers(obs)[torch.arange(obs.shape[0]), k]
    z = torch.randn(c.shape, generator=generator, dtype=obs.dtype)
    return (c + std * z).clamp(-1.0, 1.0)


def sample_obs(n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, OBS_DIM, generator=generator, dtype=dtype) * 2.0 - 1.0


def analytic_q(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The task's known action value: -||a - c0(s)||^2 (mode 0 is the best action)."""
    return -((act - mode_centers(obs)[:, 0]) ** 2).sum(-1)


# ----------------------------------------------------------------------------- training
def train_flow(path: str, steps: int, batch: int = 256, hidden: int = 128, seed: int = 0,
               log: Callable[[str], None] = print) -> ConditionalMLP:
    """Train a ConditionalMLP with ops.flow_matching_loss on the synthetic task (path "ot" or "vp")."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ConditionalMLP(ACT_DIM, OBS_DIM, hidden=hidden, depth=3, time_embedding="raw")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t_hi = 1.0 - 1e-3 if path == "vp" else 1.0  # the VP model is trained on diffusion times s in [1e-3, 1]
    for i in range(steps):
        obs = sample_obs(batch, g)
        a = sample_actions(obs, g)
        z = torch.randn(a.shape, generator=g)
        t = torch.rand(batch, generator=g) * t_hi
        x_t, _ = ops.flow_path(a, z, t, path=path)
        pred = net(x_t, t, obs)
        loss = ops.flow_matching_loss(pred[:, None], a[:, None], z[:, None], t[:, None], path=path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % max(1, steps // 4) == 0:
            log(f"  train {path} step {i + 1}/{steps}: loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def train_consistency(steps: int, batch: int = 256, hidden: int = 128, seed: int = 0,
                      log: Callable[[str], None] = print) -> ConditionalMLP:
    """Train a consistency policy (CPQL reconstruction loss, ops.consistency_loss) on the synthetic task."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = ConditionalMLP(ACT_DIM, OBS_DIM, hidden=hidden, depth=3, time_embedding="sinusoidal")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for i in range(steps):
        obs = sample_obs(batch, g)
        a = sample_actions(obs, g)
        loss = ops.consistency_loss(net, a, obs, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % max(1, steps // 4) == 0:
            log(f"  train consistency step {i + 1}/{steps}: loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- errors
def pf_ode_velocity(eps_net: Callable, path: str = "vp") -> Callable:
    """The probability-flow ODE velocity of a noise-prediction model on ``path``.

    With x_t = a(t) x0 + s(t) eps and x0_hat = (x - s eps_hat) / a:
        dx/dt = a' x0_hat + s' eps_hat = (a'/a) x + (s' - s a'/a) eps_hat(x, t).
    DDIM / DPM-Solver are discretisations of this ODE (in log-SNR); rk4 on it with many steps
    is their converged limit. a' and s' come from autograd of alpha_sigma (exact derivatives).
    """
    def v(x, t, obs):
        tt = t.detach().to(torch.float64).clone().requires_grad_(True)
        with torch.enable_grad():
            a, s = alpha_sigma(tt, path)
            da, = torch.autograd.grad(a.sum(), tt, retain_graph=True)
            ds, = torch.autograd.grad(s.sum(), tt)
        a, s = a.detach().to(x.dtype)[:, None], s.detach().to(x.dtype)[:, None]
        da, ds = da.to(x.dtype)[:, None], ds.to(x.dtype)[:, None]
        eps = eps_net(x, t, obs)
        return (da / a) * x + (ds - s * da / a) * eps
    return v


def in_log_snr_time(v: Callable, path: str, t0: float, t1: float) -> Callable:
    """The ODE dx/dt = v(x, t) rewritten in u in [0, 1] with log-SNR lambda = l0 + u (l1 - l0) uniform:
    dx/du = v(x, t(lambda)) (l1 - l0) / (dlambda/dt). On the VP path dx/dt grows like 1/(1 - t) near
    the data end, so a grid uniform in t never converges there; in lambda the flow is smooth (it is
    the variable DPM-Solver steps in)."""
    l0 = float(log_snr(torch.tensor(t0, dtype=torch.float64), path))
    l1 = float(log_snr(torch.tensor(t1, dtype=torch.float64), path))

    def f(x, u, obs):
        lam = l0 + u.detach().to(torch.float64) * (l1 - l0)
        t = inverse_log_snr(lam, path).clamp(t0, t1)
        tt = t.clone().requires_grad_(True)
        with torch.enable_grad():
            dl, = torch.autograd.grad(log_snr(tt, path).sum(), tt)
        return v(x, t.to(x.dtype), obs) * ((l1 - l0) / dl).to(x.dtype)[:, None]
    return f


def reference_solution(net: Callable, x0: torch.Tensor, obs: torch.Tensor, kind: str, steps: int,
                       path: str = "vp"):
    """(x_ref, self_error): rk4 with ``steps`` steps and with steps // 2, in x0's dtype (use float64).

    kind "velocity": net is dx/dt on [0, 1], steps uniform in t. kind "noise": net predicts eps on
    ``path``; the ODE is pf_ode_velocity on the noise solvers' clipped grid, stepped uniformly in
    log-SNR (in_log_snr_time). self_error is the mean per-sample L2 distance between the two
    resolutions (an estimate of the reference's own error).
    """
    if kind == "velocity":
        f, (t0, t1) = net, (0.0, 1.0)
    elif kind == "noise":
        a, b = time_grid(1, 0.0, 1.0, "ddim", path)
        f, (t0, t1) = in_log_snr_time(pf_ode_velocity(net, path), path, a, b), (0.0, 1.0)
    else:
        raise ValueError(f"kind must be 'velocity' or 'noise', got {kind!r}")
    with torch.no_grad():
        x = ops.integrate(f, x0, obs, steps=steps, solver="rk4", t0=t0, t1=t1, backend="torch")
        xh = ops.integrate(f, x0, obs, steps=max(1, steps // 2), solver="rk4", t0=t0, t1=t1, backend="torch")
    return x, solution_error(xh, x)


def solution_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of the L2 distance ||x - ref||: x, ref [N, A] -> float."""
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    return float((x - ref).double().norm(dim=-1).mean())


def solver_errors(net: Callable, x0: torch.Tensor, obs: torch.Tensor, ref: torch.Tensor, solvers: Sequence[str],
                  steps_list: Sequence[int] = STEPS, path: Optional[str] = None) -> Dict[str, List[float]]:
    """{solver: [error at each step count]} of ops.integrate against ``ref`` (same x0, obs, dtype)."""
    out: Dict[str, List[float]] = {}
    with torch.no_grad():
        for s in solvers:
            p = path if s in NOISE_SOLVERS else None
            out[s] = [solution_error(ops.integrate(net, x0, obs, steps=n, solver=s, path=p, backend="torch"), ref)
                      for n in steps_list]
    return out


def _try_time(fn: Callable[[], object], reps: int):
    """(best_time, None), or (None, reason) when the backend refuses the call (ops' dispatch error)."""
    try:
        return best_time(fn, reps), None
    except RuntimeError as e:
        if str(e).startswith("backend="):
            return None, str(e)
        raise


def best_time(fn: Callable[[], object], reps: int = 3) -> float:
    """Fastest of ``reps`` timed calls after one warm-up call (the minimum is the estimate least
    disturbed by other work on a shared CPU)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


# ----------------------------------------------------------------------------- quality
def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5)) -> float:
    """Unbiased squared MMD between samples x [n, d] and y [m, d], sum of RBF kernels."""
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def conditional_mmd(sampler: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, per_state: int,
                    generator: torch.Generator) -> float:
    """Mean over test states of MMD^2(policy samples, held-out true samples), per_state of each."""
    vals = []
    for i in range(states.shape[0]):
        obs = states[i:i + 1].expand(per_state, -1).contiguous()
        true = sample_actions(obs, generator)
        vals.append(mmd2(sampler(obs), true))
    return float(sum(vals) / len(vals))


# ----------------------------------------------------------------------------- the study
def _log(msg: str) -> None:
    print(msg, flush=True)


def _net_copy(net: ConditionalMLP, dtype) -> ConditionalMLP:
    m = ConditionalMLP(**{k: v for k, v in net.config().items()})
    m.load_state_dict(net.state_dict())
    return m.to(dtype).eval().requires_grad_(False)


def run_study(quick: bool = False, ref_steps: int = 512, n_eval: int = 256, time_batch: int = 1024,
              train_steps: int = 3000, backend: str = "torch", steps_list: Sequence[int] = STEPS,
              critic: Optional[Callable] = None, seed: int = 0, log: Callable[[str], None] = _log,
              also: Sequence[str] = ()) -> Dict:
    """Run the whole study and return its results (a JSON-serialisable dict).

    backend: the backend of the timed calls used for the Pareto front; ``also``: more backends
    (e.g. ("cpp",)) timed on the same calls for the cost plot, or recorded as unavailable with the
    reason qipo_kernels gives. Errors and sample quality always use the reference ("torch").
    """
    if quick:
        ref_steps, n_eval, time_batch, train_steps = min(ref_steps, 128), min(n_eval, 64), min(time_batch, 256), min(train_steps, 300)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dev = torch.device("cpu")
    res: Dict = dict(device=device_name(dev), cpu_model=cpu_model(), date=today(), torch=torch.__version__,
                     threads=torch.get_num_threads(), ref_steps=ref_steps, n_eval=n_eval, time_batch=time_batch,
                     train_steps=train_steps, backend=backend, steps=list(steps_list), models={},
                     also=list(also), backend_unavailable={},
                     critic="analytic Q(s, a) = -||a - c0(s)||^2 of the synthetic task" if critic is None
                     else "user-supplied critic",
                     env_return="not measured: the synthetic task has no environment")
    qfn = critic or analytic_q

    models = []
    rnd = ConditionalMLP(ACT_DIM, OBS_DIM, hidden=256, depth=3)  # default init, sinusoidal time features
    models.append(("random", "velocity", rnd, None))
    models.append(("random", "noise", rnd, "vp"))
    log(f"training a flow policy (ot velocity), a vp noise policy and a consistency policy, {train_steps} steps each")
    t0 = time.perf_counter()
    flow = train_flow("ot", train_steps, seed=seed, log=log)
    vp = train_flow("vp", train_steps, seed=seed, log=log)
    cm = train_consistency(train_steps, seed=seed, log=log)
    res["train_seconds"] = time.perf_counter() - t0
    models.append(("trained", "velocity", flow, None))
    models.append(("trained", "noise", vp, "vp"))

    obs64 = sample_obs(n_eval, g, torch.float64)
    x064 = torch.randn(n_eval, ACT_DIM, generator=g, dtype=torch.float64)
    obs_t = sample_obs(time_batch, g)
    x0_t = torch.randn(time_batch, ACT_DIM, generator=g)
    states = sample_obs(8 if not quick else 3, g)
    per_state = 256 if not quick else 64

    for which, kind, net, path in models:
        name = f"{which}-{kind}"
        log(f"[{name}] reference: rk4 x {ref_steps} steps in float64")
        n64 = _net_copy(net, torch.float64)
        n32 = _net_copy(net, torch.float32)
        ref, ref_err = reference_solution(n64, x064, obs64, kind, ref_steps, path or "vp")
        solvers = VELOCITY_SOLVERS if kind == "velocity" else NOISE_SOLVERS
        errs = solver_errors(n64, x064, obs64, ref, solvers, steps_list, path)
        times: Dict[str, List[float]] = {}
        for s in solvers:
            p = path if s in NOISE_SOLVERS else None
            times[s] = []
            for n in steps_list:
                with torch.no_grad():
                    times[s].append(best_time(lambda: ops.integrate(n32, x0_t, obs_t, steps=n, solver=s, path=p,
                                                                      backend=backend), reps=2 if quick else 3))
            log(f"  {s:8s} err " + " ".join(f"{e:.2e}" for e in errs[s]) + " | ms " +
                " ".join(f"{1e3 * t:.1f}" for t in times[s]))
        by_backend: Dict[str, Dict[str, List[float]]] = {}
        for b in also:
            if b in res["backend_unavailable"]:
                continue
            tb: Dict[str, List[float]] = {}
            for s in solvers:
                p = path if s in NOISE_SOLVERS else None
                tb[s] = []
                for n in steps_list:
                    with torch.no_grad():
                        tm, why = _try_time(lambda: ops.integrate(n32, x0_t, obs_t, steps=n, solver=s, path=p, backend=b),
                                            reps=2 if quick else 3)
                    if why:
                        res["backend_unavailable"][b] = why
                        log(f"  {b}: unavailable: {why}")
                        break
                    tb[s].append(tm)
                if b in res["backend_unavailable"]:
                    break
                log(f"  {s:8s} ms ({b}) " + " ".join(f"{1e3 * t:.1f}" for t in tb[s]))
            if b not in res["backend_unavailable"]:
                by_backend[b] = tb
        entry = dict(kind=kind, path=path, config=net.config(), ref_self_error=ref_err, errors=errs, times=times,
                     times_by_backend=by_backend, evaluations={s: [n * STAGES[s] for n in steps_list] for s in solvers})
        if which == "trained":
            quality: Dict[str, Dict[str, List[float]]] = {}
            for s in solvers:
                p = path if s in NOISE_SOLVERS else None
                mm, qv = [], []
                for n in steps_list:
                    def sampler(o, _s=s, _n=n, _p=p):
                        with torch.no_grad():
                            z = torch.randn(o.shape[0], ACT_DIM, generator=g)
                            return ops.integrate(n32, z, o, steps=_n, solver=_s, path=_p, backend="torch").clamp(-1, 1)
                    mm.append(conditional_mmd(sampler, states, per_state, g))
                    with torch.no_grad():
                        qv.append(float(qfn(obs_t, sampler(obs_t)).mean()))
                quality[s] = dict(mmd2=mm, q=qv)
            entry["quality"] = quality
        res["models"][name] = entry

    # consistency policy: 1, 2, 3 steps
    log("[consistency] sampling with 1, 2, 3 steps")
    c32 = _net_copy(cm, torch.float32)
    cons = dict(steps=[], sigmas=[], times=[], mmd2=[], q=[],
                times_by_backend={b: [] for b in also if b not in res["backend_unavailable"]})
    for n, sig in CM_SIGMAS.items():
        def csample(o, _sig=sig):
            with torch.no_grad():
                z = torch.randn(o.shape[0], ACT_DIM, generator=g)
                return ops.consistency_sample(c32, z, o, sigmas=_sig, generator=g, backend="torch")
        with torch.no_grad():
            tm = best_time(lambda: ops.consistency_sample(c32, x0_t, obs_t, sigmas=sig, generator=g, backend=backend),
                             reps=2 if quick else 3)
        for b in list(cons["times_by_backend"]):
            with torch.no_grad():
                tb, why = _try_time(lambda: ops.consistency_sample(c32, x0_t, obs_t, sigmas=sig, generator=g, backend=b),
                                    reps=2 if quick else 3)
            if why:
                res["backend_unavailable"][f"{b} (consistency_sample)"] = why
                del cons["times_by_backend"][b]
            else:
                cons["times_by_backend"][b].append(tb)
        cons["steps"].append(n)
        cons["sigmas"].append(sig)
        cons["times"].append(tm)
        cons["mmd2"].append(conditional_mmd(csample, states, per_state, g))
        with torch.no_grad():
            cons["q"].append(float(qfn(obs_t, csample(obs_t)).mean()))
        log(f"  {n} step(s): mmd2 {cons['mmd2'][-1]:.4f}  Q {cons['q'][-1]:.4f}  {1e3 * tm:.2f} ms")
    res["consistency"] = cons
    res["mmd2_floor"] = conditional_mmd(lambda o: sample_actions(o, g), states, per_state, g)
    res["q_true"] = float(qfn(obs_t, sample_actions(obs_t, g)).mean())
    res["q_best"] = float(qfn(obs_t, mode_centers(obs_t)[:, 0]).mean())
    return res


# ----------------------------------------------------------------------------- outputs
STYLE = {"euler": "o-", "midpoint": "s-", "heun": "^-", "rk4": "D-", "ddim": "o--", "dpm1": "x--", "dpm2": "s--"}


def pareto(points: Sequence[tuple]) -> List[tuple]:
    """The lower-left front of (time, error, label) points: no other point is both faster and more accurate."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def plots(res: Dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = res["steps"]
    title = f"{res['device']}, {res['date']}"
    written = []

    # 1. error vs steps
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, which in zip(axes, ("random", "trained")):
        for kind in ("velocity", "noise"):
            e = res["models"].get(f"{which}-{kind}")
            if not e:
                continue
            for s, errs in e["errors"].items():
                ax.plot(steps, [max(v, 1e-16) for v in errs], STYLE.get(s, "o-"),
                        label=s + (" (vp noise model)" if kind == "noise" else ""))
            ax.axhline(max(e["ref_self_error"], 1e-16), color="black" if kind == "velocity" else "tab:pink", ls=":",
                       lw=1.2, label=f"reference's own error ({kind} model)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("solver steps")
        ax.set_ylabel("mean ||x - x_ref|| (float64)")
        ax.set_title(f"{which} ConditionalMLP", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"Which solver, how many steps: error vs steps - {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    p = os.path.join(out_dir, "error_vs_steps.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)

    # 2. error vs time with the Pareto front
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    to_label = []
    for ax, which in zip(axes, ("random", "trained")):
        pts = []
        for kind in ("velocity", "noise"):
            e = res["models"].get(f"{which}-{kind}")
            if not e:
                continue
            for s in e["errors"]:
                ts = [1e3 * t for t in e["times"][s]]
                es = [max(v, 1e-16) for v in e["errors"][s]]
                ax.plot(ts, es, STYLE.get(s, "o-"), label=s, alpha=0.8)
                pts += [(t, v, f"{s}-{n}") for t, v, n in zip(ts, es, steps)]
        front = pareto(pts)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="black", lw=2, alpha=0.35, label="Pareto front")
        to_label.append((ax, front))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"time per call (ms, {res['time_batch']} samples, float32)")
        ax.set_ylabel("mean ||x - x_ref||")
        ax.set_title(f"{which} ConditionalMLP (dashed: noise solvers on the vp model)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=8, fontsize=8)
    fig.suptitle(f"Error vs time (lower left is better) - {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    for ax, front in to_label:  # labels of the Pareto front, after the layout: none overlaps another or a marker
        place_labels(ax, [(t, v) for t, v, _ in front], [lab for _, _, lab in front], fontsize=6.5)
    p = os.path.join(out_dir, "error_vs_time.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)

    # 3. cost: time per call vs steps, consistency sampling beside
    fig, ax = plt.subplots(figsize=(8.0, 5.2))
    e = res["models"].get("trained-velocity")
    n = res["models"].get("trained-noise")
    colors = {}
    for ent in (e, n):
        if not ent:
            continue
        for s in ent["times"]:
            line, = ax.plot(steps, [1e3 * t for t in ent["times"][s]], STYLE.get(s, "o-"), label=f"{s} ({res['backend']})")
            colors[s] = line.get_color()
            for b, tb in ent.get("times_by_backend", {}).items():
                if tb.get(s):
                    ax.plot(steps[:len(tb[s])], [1e3 * t for t in tb[s]], STYLE.get(s, "o-")[0] + ":",
                            color=colors[s], alpha=0.8, label=f"{s} ({b})")
    c = res.get("consistency")
    if c:
        ax.plot(c["steps"], [1e3 * t for t in c["times"]], "k*-", ms=10, label=f"consistency ({res['backend']})")
        for b, tb in c.get("times_by_backend", {}).items():
            if tb:
                ax.plot(c["steps"][:len(tb)], [1e3 * t for t in tb], "k*:", ms=10, alpha=0.7, label=f"consistency ({b})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"time per call (ms, {res['time_batch']} samples)")
    ax.set_title(f"What it costs (trained models; dotted: other backends) - {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = os.path.join(out_dir, "cost.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)

    # 4. sample quality (MMD) and critic value vs time: flow solvers vs consistency
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ent in (e, n):
        if not ent or "quality" not in ent:
            continue
        for s, q in ent["quality"].items():
            ts = [1e3 * t for t in ent["times"][s]]
            axes[0].plot(ts, q["mmd2"], STYLE.get(s, "o-"), label=s)
            axes[1].plot(ts, q["q"], STYLE.get(s, "o-"), label=s)
    if c:
        ts = [1e3 * t for t in c["times"]]
        axes[0].plot(ts, c["mmd2"], "k*-", ms=10, label="consistency 1/2/3 steps")
        axes[1].plot(ts, c["q"], "k*-", ms=10, label="consistency 1/2/3 steps")
    axes[0].axhline(res["mmd2_floor"], color="gray", ls=":", label="true vs true (noise floor)")
    axes[0].set_ylabel("MMD^2 to held-out true samples (lower is better)")
    axes[1].axhline(res["q_true"], color="gray", ls=":", label="true behaviour distribution")
    axes[1].set_ylabel("mean Q of sampled actions (analytic)" if "analytic" in res["critic"] else "mean critic value")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("time per call (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sample quality vs time: flow solvers vs consistency sampling - {title}", fontsize=11)
    fig.tight_layout()
    p = os.path.join(out_dir, "quality.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)
    return written


def markdown(res: Dict) -> str:
    steps = res["steps"]
    L = [f"# Speed-accuracy study on {res['device']}, {res['date']}", "",
         f"torch {res['torch']}, {res['threads']} thread(s); reference rk4 x {res['ref_steps']} steps in float64 on "
         f"{res['n_eval']} samples; times: best of 3 float32 calls on {res['time_batch']} samples, backend "
         f"`{res['backend']}`; training {res['train_steps']} steps per model ({res.get('train_seconds', 0):.0f} s).",
         "", f"- Critic: {res['critic']}.", f"- Environment return: {res['env_return']}.",
         *[f"- Backend {b} not timed: {why}" for b, why in res.get("backend_unavailable", {}).items()],
         f"- MMD^2 noise floor (true vs true): {res['mmd2_floor']:.2e}; Q of true samples {res['q_true']:.3f}, "
         f"of the best mode centre {res['q_best']:.3f}.", ""]
    for name, e in res["models"].items():
        L += [f"## {name} (ref self-error {e['ref_self_error']:.1e})", "",
              "| solver | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---|" * len(steps)]
        for s in e["errors"]:
            L.append(f"| {s} error | " + " | ".join(f"{v:.1e}" for v in e["errors"][s]) + " |")
            L.append(f"| {s} ms | " + " | ".join(f"{1e3 * t:.2f}" for t in e["times"][s]) + " |")
            for b, tb in e.get("times_by_backend", {}).items():
                if tb.get(s):
                    L.append(f"| {s} ms ({b}) | " + " | ".join(f"{1e3 * t:.2f}" for t in tb[s]) + " |")
            if "quality" in e:
                L.append(f"| {s} MMD^2 | " + " | ".join(f"{v:.1e}" for v in e["quality"][s]["mmd2"]) + " |")
                L.append(f"| {s} Q | " + " | ".join(f"{v:.3f}" for v in e["quality"][s]["q"]) + " |")
        L.append("")
    c = res.get("consistency")
    if c:
        tbb = {b: tb for b, tb in c.get("times_by_backend", {}).items() if tb}
        L += ["## consistency policy", "", "| steps | sigmas | ms | " + "".join(f"ms ({b}) | " for b in tbb) +
              "MMD^2 | Q |", "|---|---|---|" + "---|" * len(tbb) + "---|---|"]
        for i, (n, sg, t, m, q) in enumerate(zip(c["steps"], c["sigmas"], c["times"], c["mmd2"], c["q"])):
            L.append(f"| {n} | {sg} | {1e3 * t:.2f} | " + "".join(f"{1e3 * tb[i]:.2f} | " for tb in tbb.values()) +
                     f"{m:.1e} | {q:.3f} |")
        L.append("")
    L += ["![error vs steps](error_vs_steps.png)", "", "![error vs time](error_vs_time.png)", "",
          "![cost](cost.png)", "", "![quality](quality.png)", ""]
    return "\n".join(L)


def save(res: Dict, out_dir: str, make_plots: bool = True) -> List[str]:
    return save_study(res, out_dir, "speed_accuracy.md", markdown, plots if make_plots else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer samples and training steps")
    ap.add_argument("--ref-steps", type=int, default=512, help="rk4 steps of the float64 reference")
    ap.add_argument("--n-eval", type=int, default=256, help="samples for the error")
    ap.add_argument("--time-batch", type=int, default=1024, help="samples per timed call")
    ap.add_argument("--train-steps", type=int, default=3000, help="training steps per model")
    ap.add_argument("--backend", default="torch", help="backend of the timed calls (torch|cpp|triton|auto)")
    ap.add_argument("--also", default="", help="more backends to time on the same calls, comma-separated (e.g. cpp)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="output dir (default bench/results/<device>/speed_accuracy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", metavar="RESULTS_JSON", default=None,
                    help="only redraw the plots and the Markdown from a saved results.json")
    a = ap.parse_args(argv)
    if a.replot:
        return replot(a.replot, a.out, save)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run_study(quick=a.quick, ref_steps=a.ref_steps, n_eval=a.n_eval, time_batch=a.time_batch,
                    train_steps=a.train_steps, backend=a.backend, seed=a.seed,
                    also=[b for b in a.also.split(",") if b])
    out = a.out or os.path.join(results_dir(torch.device("cpu")), "speed_accuracy")
    for p in save(res, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
