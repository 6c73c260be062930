"""Is the ot-eps behaviour model's low BC score a sampling problem? One model, several ways to act.

Trains QIPO's default behaviour model (path "ot-eps", Fourier time features) for ``--steps`` steps of
batch 1024 at lr 1e-3 on the training slice of walker2d (as bench/qipo_bc_diagnosis.py), then prints,
on 500 held-out states, the per-dimension spread of 64 samples against the data's residual around
their mean, and the evaluated BC score (normalised, (mean, s.e.)) when acting with
  - one sample per state (QIPO's evaluation), the mean of 16 samples, one sample with 32 solver steps,
    the mean of 16 samples plus the data's N(0, 0.5^2) noise (``--episodes`` episodes each);
  - one sample from other sampler starts / solvers (t0 0.05 / 0.2 / 0.35 / 0.01 with DPM-Solver++(2S)
    x 8, DDIM x 32 from 0.05), with R^2 and saturation (``--episodes2`` episodes each).

    python bench/qipo_bc_sampler_check.py --steps 3000
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_bc_diagnosis import bc_score, r2, train_flow  # noqa: E402
from qipo_kernels.data import load_minari  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="qipo/walker2d/noisy-sac-v0")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--episodes2", type=int, default=10)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_minari(a.dataset)
    n = len(data)
    tn = int(n * 0.9)
    pol, _, _, cpu = train_flow(data, tn, a.steps, 1024, 1e-3, path="ot-eps", time_embedding="fourier")
    print("trained", cpu, flush=True)
    obs, act = data.obs[tn:tn + 500], data.actions[tn:tn + 500]
    A = data.act_dim
    g = torch.Generator().manual_seed(0)
    s = pol.sample(obs, 64, generator=g)
    print("sample std per dim (mean over states)", s.std(1).mean(0))
    print("resid std data vs flow-mean", (act - s.mean(1)).std(0))
    print("sat", (s.abs() >= 0.999).float().mean().item(), "data sat", (act.abs() >= .999).float().mean().item())

    def ev(name, fn, eps):
        t = time.process_time()
        sc = bc_score(fn, data, eps)
        print(name, sc, "cpu", time.process_time() - t, flush=True)

    eg = torch.Generator().manual_seed(1)
    ev("single", lambda o: pol.sample(o, 1, generator=eg)[:, 0], a.episodes)
    ev("mean16", lambda o: pol.sample(o, 16, generator=eg).mean(1), a.episodes)
    ev("single dpm2x32", lambda o: pol.sample(o, 1, steps=32, generator=eg)[:, 0], a.episodes)
    ev("mean16+N(0,.5)", lambda o: (pol.sample(o, 16, generator=eg).mean(1)
                                    + 0.5 * torch.randn(o.shape[0], A, generator=eg)).clamp(-1, 1), a.episodes)
    for t0, steps, solver in [(0.05, 8, "dpm2"), (0.2, 8, "dpm2"), (0.35, 8, "dpm2"), (0.05, 32, "ddim"),
                              (0.01, 8, "dpm2")]:
        p = copy.deepcopy(pol)
        p.t0, p.steps, p.solver = t0, steps, solver
        g = torch.Generator().manual_seed(0)
        s = p.sample(obs, 64, generator=g)
        eg2 = torch.Generator().manual_seed(1)
        sc = bc_score(lambda o: p.sample(o, 1, generator=eg2)[:, 0], data, a.episodes2)
        print(t0, steps, solver, "R2", round(r2(s.mean(1), act), 3), "sat",
              round((s.abs() >= .999).float().mean().item(), 3), "BC", sc, flush=True)


if __name__ == "__main__":
    main()
