"""CPU benchmark: other people's trained actors, run their way (official-style eager loop) and through
qipo_kernels (make_sampler / Sampler.act on the C++ backend), in one process on identical weights.

Actors (the official architectures, built by tests/_official.py with the official state_dict layouts:
MLP 3 x 256 Mish, t_dim 16; critic 3 x 256 Mish), obs 17, action 6:
    cpql-onestep      CPQL KarrasDenoiser one step, LayerNorm critic (offline)
    cpql-multistep    CPQL multistep (ts = [0, 20, 40] of N = 40: 4 network evaluations), as on AntMaze
    diffusion-ql      Diffusion-QL Diffusion, T = 5 vp steps, plain critic

Rows per actor:
    sample  B states, 1 action each: their ``sample`` vs ``make_sampler(actor)(obs)``
    act     B states x 50 candidates + min(Q1, Q2) + a softmax(Q) draw: their ``sample_action`` (batched
            over states: repeat_interleave, sample, q_min, softmax, multinomial) vs ``Sampler.act(obs, critic)``
for B = 1 and B = 256. One torch thread for both sides; medians of interleaved timings; ratio = official / ours.

    python bench/bench_foreign.py            # writes bench/results/foreign-<cpu>-<date>.json
    python bench/bench_foreign.py --no-write --min-time 0.5
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.dirname(HERE))

import qipo_kernels as qk  # noqa: E402
from qipo_kernels import backends  # noqa: E402
from qipo_kernels.nets import DoubleCritic  # noqa: E402
from qipo_kernels.reference import cpql_multistep_sigmas  # noqa: E402

from _official import OfficialCritic, OfficialDiffusion, OfficialMLP, karras_official_sample  # noqa: E402
from bench.bench_cpu import compare, cpu_name  # noqa: E402

S, A, K = 17, 6, 50


def _official_sampler(kind, model, diff):
    """obs [N, S] -> actions [N, A], drawing its noise as the official code does (global RNG)."""
    if kind == "diffusion-ql":
        def f(obs):
            x = torch.randn((obs.shape[0], A))
            return diff.sample(obs, x, [torch.randn_like(x) for _ in range(diff.T - 1)])
        return f
    ts = [0, 20, 40] if kind == "cpql-multistep" else None

    def g(obs):
        x = torch.randn((obs.shape[0], A))
        return karras_official_sample(model, obs, x, [torch.randn_like(x) for _ in range(len(ts or ()))], ts)
    return g


def _official_act(sampler, critic):
    def f(obs):
        B = obs.shape[0]
        rpt = torch.repeat_interleave(obs, repeats=K, dim=0)
        act = sampler(rpt)
        q = critic.q_min(rpt, act).reshape(B, K)
        idx = torch.multinomial(F.softmax(q, dim=1), 1)[:, 0]
        return act.reshape(B, K, A)[torch.arange(B), idx]
    return f


def build(kind):
    torch.manual_seed(0)
    model = OfficialMLP(S, A)
    if kind == "diffusion-ql":
        diff = OfficialDiffusion(model, 5, "vp", 1.0, True)
        off_critic = OfficialCritic(S, A)
        smp = qk.make_sampler(diff)
        critic = DoubleCritic.from_diffusion_ql_state_dict(off_critic.state_dict(), obs_dim=S)
    else:
        diff = None
        off_critic = OfficialCritic(S, A, norm="layernorm")
        smp = qk.make_sampler(model, kind="consistency",
                              sigmas=cpql_multistep_sigmas() if kind == "cpql-multistep" else None)
        critic = DoubleCritic.from_cpql_state_dict(off_critic.state_dict(), obs_dim=S)
    return _official_sampler(kind, model, diff), off_critic, smp, critic


def _isa():
    try:
        from qipo_kernels import _C

        return _C.isa()
    except ImportError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", default="cpql-onestep,cpql-multistep,diffusion-ql")
    p.add_argument("--states", default="1,256")
    p.add_argument("--min-time", type=float, default=1.5, help="seconds of timing per side and row")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cpp_why = backends.backend_reasons("cpp", torch.device("cpu"))
    load_start = os.getloadavg()  # the machine may be shared: the ratios are interleaved, the times are not clean
    rows = []
    for kind in a.actors.split(","):
        off_sample, off_critic, smp, critic = build(kind)
        off_act = _official_act(off_sample, off_critic)
        for B in (int(b) for b in a.states.split(",")):
            obs = torch.randn(B, S)
            for what, ref, fast in (("sample", lambda: off_sample(obs), lambda: smp(obs)),
                                    ("act", lambda: off_act(obs), lambda: smp.act(obs, critic))):
                with torch.no_grad():
                    r_med, f_med, r_min, f_min = compare(ref, fast, a.min_time)
                    used = smp.backend_used(obs)
                row = dict(actor=kind, op=what, states=B, candidates=K if what == "act" else 1,
                           official_ms=1e3 * r_med, ours_ms=1e3 * f_med, ratio=r_med / f_med,
                           official_min_ms=1e3 * r_min, ours_min_ms=1e3 * f_min, backend=used)
                rows.append(row)
                print(f"{kind:15s} {what:6s} B={B:<4d} official {1e3 * r_med:8.3f} ms  ours ({used}) "
                      f"{1e3 * f_med:8.3f} ms  x{r_med / f_med:5.2f}", flush=True)
    out = dict(device=cpu_name(), cpus=os.cpu_count(), date=_dt.date.today().isoformat(), torch=torch.__version__,
               threads=1, isa=_isa(), loadavg_start=load_start, loadavg_end=os.getloadavg(), cpp_reasons=cpp_why,
               rows=rows)
    if not a.no_write:
        os.makedirs(a.out_dir, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in cpu_name().lower()).strip("-")[:40]
        path = os.path.join(a.out_dir, f"foreign-{slug}-{out['date']}.json")
        fd, tmp = tempfile.mkstemp(dir=a.out_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)
        print("wrote", path)
    return out


if __name__ == "__main__":
    main()
