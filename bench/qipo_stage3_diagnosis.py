"""Why QIPO's stage 3 (policy improvement) lowers the behaviour model's score: variants from one checkpoint.

One command:

    python bench/qipo_stage3_diagnosis.py \\
        --ckpt /work/data/tts/qipo-cpu-30min-beta_1.0-walker2d-s1/run/checkpoint.pt \\
        --steps 500 --eval-at 100 250 500 --episodes 30 --out bench/results/qipo_stage3_diagnosis

It rebuilds the QIPO trainer of the checkpoint's run (its config; stages 1-2 are not rerun), loads the
frozen behaviour model and stage-2 critic, puts the step counter at the start of stage 3 and draws the
first support set exactly as the run did (trainer._renew_support: the EMA = behaviour model, the
run's noise key). That support (and its critic scores) is cached in --cache and shared by every variant
that does not change it. Then, per variant, the policy and its EMA restart from the behaviour model
with a fresh Adam (the checkpoint config's policy lr and batch) and run --steps policy steps; the EMA
policy is evaluated at 0 (the behaviour model, once) and at each --eval-at step.

Variants (--variants):
  preset       the checkpoint's stage-3 loss with beta 3 (the cpu-30min preset)
  uniform      beta 1e-6: uniform weights = self-distillation on the behaviour model's own samples
  bc           plain flow matching on the dataset actions (M = 1), same optimizer / lr / batch
  keep_data    beta 3, keep_data_action=True (slot 0 of every support set = the dataset action; Alg. 2)
  batch        beta 3, normalize="batch" (the paper's Algorithm 1)
  beta1        beta 1
  beta10       beta 10 (sharper weights: toward the critic's argmax; not a paper setting)
  beta30       beta 30
  beta10_lr1e-3  beta 10 with policy lr 1e-3 (the preset's is 3e-4)
  beta10_b512  beta 10 with policy batch 512 states (the preset's is 128)
  argmax_bc    plain flow matching on each state's critic-argmax support action (beta -> infinity, one
               target per state, no renewal) at stage 1's batch 1024 and lr 1e-3: can the flow learn the
               argmax-of-M policy at all in this many steps (not a QIPO setting: a diagnostic)
  sampled_beta3 / sampled_beta10  QIPO's weighted loss estimated by sampling: per state in the batch, one
               support action drawn with probability softmax(beta Q) (in expectation proportional to the
               support-normalised weighted loss), plain flow matching on it, batch 1024 states, lr 1e-3: the
               same objective at 1/M of the network evaluations per state (a diagnostic, not a QIPO option)
Support statistics: effective support size per state 1 / sum_j w_j^2 (beta 3 and 1), saturated
coordinates (|a| >= 0.999) in the support vs the data, the distance of the support to the data action,
where the critic ranks the data action among the 64 samples; the stage-3 loss gradient with
backend="torch" vs backend=cfg.backend on a real batch; the renewal sampler (block_noise, batched)
vs the evaluation sampler (a generator, one sample per state) on the same states.

Writes <out>.json and <out>.md (temp-then-rename, after every variant).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import pm, score_text  # noqa: E402
from qipo_kernels.algos.common import atomic_write_json, atomic_write_text, hard_update, polyak  # noqa: E402
from qipo_kernels.algos.distributed import flow_loss  # noqa: E402
from qipo_kernels.algos.qipo import QIPO, QIPOConfig  # noqa: E402
from qipo_kernels.data import load_minari  # noqa: E402
from qipo_kernels.nets import DoubleCritic  # noqa: E402
from qipo_kernels.reference.loss import draw_weighted_pairs, energy_weights  # noqa: E402

VARIANTS = {
    "preset": dict(beta=3.0),
    "uniform": dict(beta=1e-6),
    "bc": dict(bc=True),
    "keep_data": dict(beta=3.0, keep_data_action=True),
    "batch": dict(beta=3.0, normalize="batch"),
    "beta1": dict(beta=1.0),
    "beta10": dict(beta=10.0),
    "beta30": dict(beta=30.0),
    "beta10_lr1e-3": dict(beta=10.0, lr=1e-3),
    "beta10_b512": dict(beta=10.0, batch=512),
    "argmax_bc": dict(argmax_bc=True, batch=1024, lr=1e-3),
    "sampled_beta3": dict(sampled=True, beta=3.0, batch=1024, lr=1e-3),
    "sampled_beta10": dict(sampled=True, beta=10.0, batch=1024, lr=1e-3),
    # diagnostic only (not an algorithm option): self-distillation on the same support samples before the
    # sampler's final clamp to [-1, 1] (same noise, so the clamped version is the shared support)
    "uniform_noclip": dict(beta=1e-6, noclip=True),
}
SAT = 0.999


def cpu_s():
    return time.process_time()


def load_trainer(ckpt_path, names, out_dir, ds=None, dataset_id=None):
    """A QIPO trainer of a finished run's config (no checkpoints, no TensorBoard) with the networks ``names``
    loaded from its checkpoint, nothing else (cli.load_checkpoint would also restore the run's state and
    redraw a support set too large to store: a full-dataset sampling pass these scripts do not need).
    ``ds`` is reused when it is the checkpoint's dataset (or ``dataset_id``). Returns (trainer, checkpoint)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    conf = dict(ck["config"])
    conf.update(checkpoint_every=0, tensorboard=False)
    cfg = QIPOConfig(**conf)
    did = dataset_id or ck["dataset_id"]
    if ds is None or ds.dataset_id != did:
        ds = load_minari(did)
    tr = QIPO(ds, cfg, out_dir=out_dir, progress_bar=False)
    for name in names:
        tr.modules[name].load_state_dict(ck["modules"][name])
    return tr, ck


def model_label(tr, ck, name="behaviour"):
    """A report row's name for one model of a run loaded by load_trainer: dataset, seed, path, bound_dequant
    (when on), and which model: the stage-1 behaviour model or the final EMA policy ("ema")."""
    cfg = tr.cfg
    return f"{tr.dataset.dataset_id}, seed {cfg.seed}, path {cfg.path}" + (
        f", bound_dequant {cfg.bound_dequant:g}" if cfg.bound_dequant else "") + (
        f", stage 1 {tr.P} steps" if name == "behaviour" else f", final EMA policy (step {ck['step']})")


def critic_from(tr, path):
    """Replace ``tr``'s frozen critic (and target) by the target critic of another run's checkpoint on the same
    dataset (e.g. a CPQL run: clipped double Q trained on the current actor's actions, LayerNorm), to ask
    whether a critic trained another way ranks the behaviour model's samples better. Not a QIPO option: a
    diagnostic. Both runs load the dataset the same way (reward scale, observation normalisation), checked."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    conf, mine = ck["config"], dataclasses.asdict(tr.cfg)
    if ck["dataset_id"] != tr.dataset.dataset_id:
        raise SystemExit(f"--critic-from {path}: dataset {ck['dataset_id']!r}, expected {tr.dataset.dataset_id!r}")
    for k in ("reward_scale", "normalize_obs"):
        if conf.get(k, "auto" if k == "reward_scale" else True) != mine[k]:
            raise SystemExit(f"--critic-from {path}: {k}={conf.get(k)!r}, the QIPO run has {mine[k]!r}")
    d = tr.dataset
    crit = DoubleCritic(d.obs_dim, d.act_dim, int(conf["critic_hidden"]), int(conf["critic_depth"]),
                        conf.get("critic_activation", "mish"), layer_norm=bool(conf.get("layer_norm", False)))
    crit.load_state_dict(ck["modules"]["critic_target"])
    crit.requires_grad_(False).eval()
    tr.critic = tr.critic_target = crit
    return {"path": path, "algo": ck.get("algo"), "step": int(ck["step"])}


def critic_from_note(src, used_for: str):
    """The report lines that say a --critic-from critic replaced the run's own ([] when it did not)."""
    if not src:
        return []
    return [f"**Critic**: the target critic of `{src['path']}` ({src['algo']}, step {src['step']}), not the QIPO "
            f"run's own stage-2 critic, for {used_for} (a diagnostic, not a QIPO option).", ""]


@torch.no_grad()
def support_q(tr, sup, chunk=8192):
    """min-Q of tr.critic on a support set [N, M, A] of the dataset's states: [N, M] (M = 1: the data
    actions' values, ``support_q(tr, d.actions[:, None])[:, 0]``)."""
    d, M = tr.dataset, sup.shape[1]
    return torch.cat([tr.critic.q_min(d.obs[i:i + chunk].repeat_interleave(M, 0),
                                      sup[i:i + chunk].reshape(-1, d.act_dim)).reshape(-1, M)
                      for i in range(0, len(sup), chunk)])


def normalized_se(res):
    """The normalised score's standard error of an evaluate() result (nan for one episode: no spread to measure)."""
    se = res.get("normalized_se")
    return float("nan") if se is None else float(se)


def build(ckpt_path, out_dir, dataset_id=None):
    tr, ck = load_trainer(ckpt_path, ("behaviour", "critic", "critic_target"), out_dir, dataset_id=dataset_id)
    tr.step = tr.P + tr.Q
    hard_update(tr.policy, tr.behaviour)
    hard_update(tr.ema, tr.behaviour)
    return tr, ck


@torch.no_grad()
def drift(tr, pol, n=2048, K=16):
    """How far ``pol``'s samples are from the data on a fixed set of n dataset states (K samples each, a
    fixed noise draw): saturated coordinates, spread within a state, distance of the per-state sample mean
    to the data action; and the plain flow-matching loss on the data actions (fixed t, noise)."""
    d = tr.dataset
    g = torch.Generator().manual_seed(4321)
    idx = torch.randperm(len(d.actions), generator=g)[:n]
    obs, act = d.obs[idx], d.actions[idx]
    x = pol.sample(obs, K, generator=g, backend=tr.cfg.backend)
    t = torch.rand((n, 1), generator=g)
    z = torch.randn((n, 1, act.shape[1]), generator=g)
    bc = pol.loss(obs, act, t=t, noise=z, backend="torch")
    return {"saturated": round(float((x.abs() >= SAT).float().mean()), 4),
            "std_within_state": round(float(x.std(1).mean()), 4),
            "dist_mean_to_data": round(float((x.mean(1) - act).norm(dim=-1).mean()), 4),
            "data_fm_loss": round(float(bc), 4)}


def evaluate(tr, step, episodes):
    """The EMA policy's normalised score (mean, s.e. over episodes; the eval generator is seeded by step)
    and its drift from the data (``drift``)."""
    tr.step = step
    t0 = cpu_s()
    res = tr.evaluate(num_episodes=episodes, policy=tr.ema)
    return {"step": step - tr.P - tr.Q, "normalized": float(res["normalized_mean"]), "se": normalized_se(res),
            "episodes": res["episodes"],
            "eval_cpu_s": round(cpu_s() - t0, 1), "drift": drift(tr, tr.ema)}


def support_stats(tr, sup, q):
    d = tr.dataset
    a = d.actions
    st = {}
    for beta in (3.0, 1.0):
        w = energy_weights(q, beta)
        ess = 1.0 / (w ** 2).sum(1)
        st[f"ess_beta{beta:g}"] = {"mean": float(ess.mean()), "median": float(ess.median()),
                                   "p10": float(ess.quantile(0.1)), "frac_below_2": float((ess < 2).float().mean())}
        st[f"max_weight_beta{beta:g}_mean"] = float(w.max(1).values.mean())
    st["q_spread_per_state"] = {"std_mean": float(q.std(1).mean()), "range_mean": float((q.amax(1) - q.amin(1)).mean())}
    st["saturated_support"] = float((sup.abs() >= SAT).float().mean())
    st["saturated_data"] = float((a.abs() >= SAT).float().mean())
    st["saturated_support_per_dim"] = [float(x) for x in (sup.abs() >= SAT).float().mean((0, 1))]
    st["saturated_data_per_dim"] = [float(x) for x in (a.abs() >= SAT).float().mean(0)]
    dist = (sup - a[:, None]).norm(dim=-1)  # [N, M]
    st["dist_to_data"] = {"mean_over_support": float(dist.mean()), "min_over_support": float(dist.amin(1).mean())}
    # spread of the support itself: distance of each sample to its state's support mean
    st["support_spread"] = float((sup - sup.mean(1, keepdim=True)).norm(dim=-1).mean())
    st["dist_support_mean_to_data"] = float((sup.mean(1) - a).norm(dim=-1).mean())
    qd = support_q(tr, a[:, None])[:, 0]
    better = (q > qd[:, None]).float().sum(1)  # samples the critic prefers to the data action
    st["data_action_rank"] = {"mean_samples_above": float(better.mean()), "median_samples_above": float(better.median()),
                              "frac_data_best": float((better == 0).float().mean()),
                              "frac_data_worst": float((better == q.shape[1]).float().mean())}
    st["q_data_minus_support_mean"] = float((qd - q.mean(1)).mean())
    # weight that each variant puts on the top-weighted sample vs the argmax sample's distance to data
    top = q.argmax(1)
    st["dist_argmax_to_data"] = float((sup[torch.arange(len(a)), top] - a).norm(dim=-1).mean())
    return st


def grad_check(tr, sup, q, B=128, seed=0):
    """Stage-3 loss and its gradient, backend torch vs cfg.backend, on one real batch (same t, noise)."""
    g = torch.Generator().manual_seed(seed)
    d, pol, cfg = tr.dataset, tr.policy, tr.cfg
    idx = torch.randint(0, len(d.actions), (B,), generator=g)
    M, A = sup.shape[1], sup.shape[2]
    t = torch.rand((B, M), generator=g)
    z = torch.randn((B, M, A), generator=g)
    out = {}
    for norm in ("support", "batch"):
        for beta in (3.0, 1.0):
            res = {}
            for be in ("torch", cfg.backend):
                pol.zero_grad(set_to_none=True)
                loss = pol.loss(d.obs[idx], sup[idx], energy=q[idx], beta=beta, normalize=norm, t=t, noise=z,
                                backend=be)
                loss.backward()
                res[be] = (float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in pol.parameters()]).clone())
            (l0, g0), (l1, g1) = res["torch"], res[cfg.backend]
            out[f"{norm}_beta{beta:g}"] = {"loss_torch": l0, f"loss_{cfg.backend}": l1,
                                           "grad_max_abs_diff": float((g0 - g1).abs().max()),
                                           "grad_rel_l2": float((g0 - g1).norm() / g0.norm())}
    pol.zero_grad(set_to_none=True)
    return out


def sampler_check(tr, sup, n=2048):
    """Renewal samples (block_noise, backend cfg.backend, M = 64 per state) vs evaluation-style samples
    (generator, one per state, x 64 draws) vs the plain-PyTorch sampler, on the first n states."""
    d, pol, be = tr.dataset, tr.behaviour, tr.cfg.backend
    obs = d.obs[:n]
    M = sup.shape[1]
    g = torch.Generator().manual_seed(123)
    ev = torch.stack([pol.sample(obs, 1, generator=g, backend=be)[:, 0] for _ in range(M)], 1)  # [n, M, A]
    ref = pol.sample(obs, M, generator=g, backend="torch")
    ren = sup[:n]

    def summ(x):
        return {"mean": [round(float(v), 4) for v in x.mean((0, 1))], "std_within_state": float(x.std(1).mean()),
                "saturated": float((x.abs() >= SAT).float().mean()),
                "dist_state_mean_to_data": float((x.mean(1) - d.actions[:n]).norm(dim=-1).mean())}
    r = {"renewal": summ(ren), "eval_sampler": summ(ev), "torch_sampler": summ(ref)}
    # per-state mean difference over the s.e. of a difference of two M-sample means, the within-state
    # variance pooled over states (~1 when both draws come from one distribution; per-state variances
    # would divide by ~0 where a state's samples all sit at the bound)
    for other, x in (("eval", ev), ("torch", ref)):
        se = float((ren.var(1).mean() / M + x.var(1).mean() / M).sqrt())
        r[f"rms_state_mean_diff_over_se_renewal_vs_{other}"] = float((ren.mean(1) - x.mean(1)).pow(2).mean().sqrt()) / max(se, 1e-12)
    return r


@torch.no_grad()
def unclamped_support(tr, M):
    """The first support's samples before the clamp: the renewal's noise key, policy.sample(clip=False)."""
    from qipo_kernels.algos.distributed import block_noise, stream_id

    obs, cfg = tr.dataset.obs, tr.cfg
    key = (int(cfg.seed), stream_id("renew-support"), tr.P + tr.Q)
    out = []
    for i in range(0, len(obs), cfg.renew_chunk):
        j = min(i + cfg.renew_chunk, len(obs))
        noise = block_noise(key, i, j, (M, tr.ema.act_dim), obs.dtype, obs.device)
        out.append(tr.behaviour.sample(obs[i:j], M, noise=noise, clip=False, backend=cfg.backend))
    return torch.cat(out)


def unchecked_loss(pol, obs, actions, gen):
    """Plain (uniform-weight) flow-matching loss without the [-1, 1] range check (reference formulas)."""
    from qipo_kernels.reference.loss import _flow_matching_loss
    from qipo_kernels.reference.paths import _flow_path

    B, M, A = actions.shape
    t = torch.rand((B, M), generator=gen)
    z = torch.randn((B, M, A), generator=gen)
    x_t, _ = _flow_path(actions, z, t, pol.path)
    pred = pol.net(x_t.reshape(B * M, A), t.reshape(B * M), obs.repeat_interleave(M, dim=0)).reshape(B, M, A)
    return _flow_matching_loss(pred, actions, z, t, pol.path, None, 1.0, "support", None)


def run_variant(tr, name, sup, q, steps, eval_at, episodes, seed, renew_every, on_point=None):
    """Stage 3 of ``steps`` policy steps from the behaviour model, evaluated at ``eval_at``. ``on_point`` (if
    given) receives the variant's result so far, marked ``"partial": True``, after every evaluation, so a long
    run leaves its points on disk before it ends."""
    v = VARIANTS[name]
    cfg, d = tr.cfg, tr.dataset
    if v.get("noclip"):
        t0 = cpu_s()
        raw = unclamped_support(tr, sup.shape[1])
        info = {"cpu_s": round(cpu_s() - t0, 1), "frac_beyond_1": float((raw.abs() > 1).float().mean()),
                "clamped_max_abs_diff_to_shared": float((raw.clamp(-1, 1) - sup).abs().max()),
                "max_abs": float(raw.abs().max())}
        print(f"  unclamped support: {info}", flush=True)
        sup = raw
    hard_update(tr.policy, tr.behaviour)
    hard_update(tr.ema, tr.behaviour)
    opt = torch.optim.Adam(tr.policy.parameters(), lr=v.get("lr", cfg.policy_lr))
    tr.gen.manual_seed(seed)
    if v.get("keep_data_action"):
        sup = sup.clone()
        q = q.clone()
        sup[:, 0] = d.actions
        q[:, 0] = support_q(tr, d.actions[:, None])[:, 0]
    if v.get("argmax_bc"):   # each state's highest-Q support action: [N, A]
        best = sup[torch.arange(len(sup)), q.argmax(1)]
    start = tr.P + tr.Q
    pts, losses, t_train, renewals = [], [], 0.0, []
    info = info if v.get("noclip") else None
    for k in range(1, steps + 1):
        t0 = cpu_s()
        tr.step = start + k - 1
        if k > 1 and (k - 1) % renew_every == 0 and not (v.get("bc") or v.get("argmax_bc")):
            if v.get("noclip"):
                raise SystemExit("uniform_noclip has no renewal: use --steps <= renew_every")
            # a support renewal from this variant's EMA, as the trainer does (the run's noise key)
            tr._renew_support()
            sup, q = tr.support, tr.support_q
            if v.get("keep_data_action"):
                sup[:, 0] = d.actions
                q[:, 0] = support_q(tr, d.actions[:, None])[:, 0]
            w = energy_weights(q, 3.0)
            renewals.append({"step": k - 1, "saturated": float((sup.abs() >= SAT).float().mean()),
                             "ess_beta3_mean": float((1.0 / (w ** 2).sum(1)).mean()),
                             "q_std_per_state": float(q.std(1).mean()), "cpu_s": round(cpu_s() - t0, 1)})
            print(f"  {name}: renewal at step {k - 1}: {renewals[-1]}", flush=True)
        idx = tr._idx(v.get("batch", cfg.policy_batch))
        if v.get("bc"):
            loss = flow_loss(tr, tr.policy, d.obs[idx], d.actions[idx])
        elif v.get("argmax_bc"):
            loss = flow_loss(tr, tr.policy, d.obs[idx], best[idx])
        elif v.get("sampled"):
            # QIPOConfig(support_estimator="sampled")'s draw: one support action per state by its weight
            _, j = draw_weighted_pairs(q[idx], v["beta"], generator=tr.gen)
            loss = flow_loss(tr, tr.policy, d.obs[idx], sup[idx, j])
        elif v.get("noclip"):
            loss = unchecked_loss(tr.policy, d.obs[idx], sup[idx], tr.gen)
        else:
            loss = flow_loss(tr, tr.policy, d.obs[idx], sup[idx], energy=q[idx], beta=v["beta"],
                             normalize=v.get("normalize", "support"), backend=cfg.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        polyak(tr.ema, tr.policy, cfg.ema_tau)
        t_train += cpu_s() - t0
        losses.append(float(loss.detach()))
        if k in eval_at:
            p = evaluate(tr, start + k, episodes)
            p["loss_last100"] = float(np.mean(losses[-100:]))
            pts.append(p)
            print(f"  {name} step {k}: {score_text(p)}  (train {t_train:.0f} CPU-s)", flush=True)
            if on_point is not None and k < steps:
                on_point({"variant": name, "settings": v, "points": list(pts), "train_cpu_s": round(t_train, 1),
                          "renewals": list(renewals), "partial": True})
    return {"variant": name, "settings": v, "points": pts, "train_cpu_s": round(t_train, 1), "renewals": renewals,
            **({"unclamped_support": info} if info is not None else {})}


def compare_checkpoints(paths, episodes, ds=None):
    """Behaviour model vs final EMA policy of finished runs (both stored in the end-of-run checkpoint; the
    behaviour model is frozen after stage 1), each with ``episodes`` evaluation episodes."""
    rows = []
    for path in paths:
        tr, ck = load_trainer(path, ("behaviour", "ema"), os.path.join("/tmp", "qipo_stage3_diag_cmp"), ds)
        ds, cfg = tr.dataset, tr.cfg
        row = {"ckpt": path, "seed": cfg.seed, "step": ck["step"],
               "config": f"{cfg.beta:g}, {cfg.policy_lr:g}, {cfg.path}"}
        for name, pol in (("behaviour", tr.behaviour), ("final_ema", tr.ema)):
            tr.step = ck["step"]
            r = tr.evaluate(num_episodes=episodes, policy=pol)
            row[name] = {"normalized": float(r["normalized_mean"]), "se": normalized_se(r), "episodes": r["episodes"],
                         "drift": drift(tr, pol)}
        print(f"  {path}: behaviour {score_text(row['behaviour'])}, final EMA {score_text(row['final_ema'])}",
              flush=True)
        rows.append(row)
    return rows


def _score_cell(p):
    """"mean ± s.e." of an evaluation (s.e. nan in memory, null after a JSON round trip for one episode)."""
    return score_text(p)


def write(res, out):
    atomic_write_json(res, out + ".json")
    L = ["# QIPO stage 3 on one checkpoint: which part of the stage-3 data path loses the behaviour model's score",
         "", "Command:", "", "    " + res["command"], "",
         f"Checkpoint: `{res['ckpt']}` (dataset {res['dataset']}, seed {res['seed']}); stage-3 settings from its "
         f"config: policy batch {res['policy_batch']}, lr {res['policy_lr']}, EMA tau {res['ema_tau']}, "
         f"M = {res['num_support']}, renewal every {res.get('renew_every', '(the config)')} steps, "
         f"sampler steps {res.get('sample_steps', '(the config)')} (supports, renewals, evaluation), "
         f"backend {res['backend']!r}. Support renewal: {res['renew_cpu_s']} CPU-s "
         f"({'cached' if res['support_cached'] else 'drawn'}). Scores: EMA policy, normalised, mean ± s.e. over "
         f"{res['episodes']} episodes (evaluation seed 0, eval generator seeded by the step).", ""]
    L += critic_from_note(res.get("critic_from"), "the support weights and the keep_data / renewal scores")
    L += ["## Score after N policy steps", "",
         "| variant | settings | " + " | ".join(f"step {s}" for s in [0] + res["eval_at"]) + " | train CPU-s |",
         "|---|---|" + "---|" * (len(res["eval_at"]) + 2)]
    b = res["behaviour"]
    for r in res["variants"]:
        cells = [_score_cell(b)] + [_score_cell(p) for p in r["points"]]
        cells += ["-"] * (len(res["eval_at"]) + 1 - len(cells))
        name = r["variant"] + (f" (stopped after step {r['stopped_at']})" if r.get("stopped_at")
                               else " (running)" if r.get("partial") else "")
        L.append(f"| {name} | {json.dumps(r['settings'])} | " + " | ".join(cells) + f" | {r['train_cpu_s']} |")
    L += ["", "## Drift of the EMA policy's samples from the data (2,048 fixed dataset states x 16 samples)", "",
          "saturated: fraction of coordinates with |a| >= 0.999 (the data: "
          f"{res.get('saturated_data', float('nan')):.3f}); spread: mean per-state std; "
          "dist: mean distance of the per-state sample mean to the data action; data FM loss: the plain "
          "flow-matching loss on the data actions (fixed t, noise). Last column: mean of the last 100 training losses.", "",
          "| variant | step | saturated | spread | dist | data FM loss | train loss |", "|---|---|---|---|---|---|---|"]
    bd = b["drift"]
    L.append(f"| behaviour model | 0 | {bd['saturated']:.4f} | {bd['std_within_state']:.4f} | "
             f"{bd['dist_mean_to_data']:.4f} | {bd['data_fm_loss']:.4f} | - |")
    for r in res["variants"]:
        for p in r["points"]:
            dd = p["drift"]
            L.append(f"| {r['variant']} | {p['step']} | {dd['saturated']:.4f} | {dd['std_within_state']:.4f} | "
                     f"{dd['dist_mean_to_data']:.4f} | {dd['data_fm_loss']:.4f} | {p['loss_last100']:.4f} |")
    if res.get("compare"):
        L += ["", "## Finished runs: behaviour model vs final EMA policy, "
              f"{res['compare'][0]['behaviour']['episodes']} episodes each (same evaluation seeds)", "",
              "    " + res.get("compare_command", res["command"]), "",
              "| checkpoint | seed | config (beta, policy_lr, path) | behaviour model | final EMA | difference | "
              "saturated (behaviour / final) |", "|---|---|---|---|---|---|---|"]
        for r in res["compare"]:
            b_, f_ = r["behaviour"], r["final_ema"]
            diff = f_["normalized"] - b_["normalized"]
            ses = [float("nan") if x["se"] is None else x["se"] for x in (b_, f_)]
            dse = (ses[0] ** 2 + ses[1] ** 2) ** 0.5
            L.append(f"| {r['ckpt']} | {r['seed']} | {r['config']} | {score_text(b_)} | "
                     f"{score_text(f_)} | {'+' if diff >= 0 else ''}{pm(diff, dse)} | "
                     f"{b_['drift']['saturated']:.3f} / {f_['drift']['saturated']:.3f} |")
    ren = [(r["variant"], x) for r in res["variants"] for x in r.get("renewals", [])]
    if ren:
        L += ["", "## Support renewals inside the variants (from the variant's EMA; the first support is shared)", "",
              "| variant | at step | saturated | ESS (beta 3) | per-state Q std | CPU-s |", "|---|---|---|---|---|---|"]
        L += [f"| {n} | {x['step']} | {x['saturated']:.4f} | {x['ess_beta3_mean']:.1f} | {x['q_std_per_state']:.3f} | "
              f"{x['cpu_s']} |" for n, x in ren]
    for key in ("support_stats", "grad_check", "sampler_check", "extra"):
        if key in res:
            L += ["", f"## {key}", "", "```json", json.dumps(res[key], indent=1), "```"]
    atomic_write_text("\n".join(L) + "\n", out + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--dataset", default=None, help="default: the checkpoint's dataset id")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[100, 250, 500])
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=["preset", "uniform", "bc", "keep_data"], choices=list(VARIANTS))
    ap.add_argument("--cache", default="/work/data/stage3diag/support.pt", help="renewed support cache ('' = none)")
    ap.add_argument("--seed", type=int, default=0, help="batch draws of every variant")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--renew-every", type=int, default=None,
                    help="support renewal period in policy steps (default: the checkpoint's renew_every)")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="solver steps of every sampler here (supports, renewals, evaluation, drift; default: the "
                         "checkpoint's sample_steps); not a preset knob: a diagnostic of the sampler's share")
    ap.add_argument("--critic-from", default=None, metavar="CKPT",
                    help="use this run's target critic (e.g. a CPQL checkpoint on the same dataset) for the weights")
    ap.add_argument("--compare", nargs="*", default=[], metavar="CKPT",
                    help="finished runs' checkpoints: evaluate their behaviour model and final EMA (--compare-episodes)")
    ap.add_argument("--compare-episodes", type=int, default=50)
    ap.add_argument("--only-compare", action="store_true", help="skip the variants; merge into an existing <out>.json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_stage3_diagnosis"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.renew_every is not None and a.renew_every < 1:
        raise SystemExit(f"--renew-every must be >= 1, got {a.renew_every}")
    if a.sample_steps is not None and a.sample_steps < 1:
        raise SystemExit(f"--sample-steps must be >= 1, got {a.sample_steps}")
    if a.only_compare:
        res = json.load(open(a.out + ".json"))
        res["compare"] = compare_checkpoints(a.compare, a.compare_episodes)
        res["compare_command"] = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        write(res, a.out)
        return
    tr, ck = build(a.ckpt, os.path.join("/tmp", "qipo_stage3_diag_run"), a.dataset)
    cfg = tr.cfg
    run_sample_steps = cfg.sample_steps   # the checkpoint's own, before --sample-steps
    if a.sample_steps is not None:
        cfg.sample_steps = a.sample_steps
        for pol in (tr.behaviour, tr.policy, tr.ema):
            pol.steps = a.sample_steps
    critic_src = critic_from(tr, a.critic_from) if a.critic_from else None
    res = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "ckpt": a.ckpt,
           "critic_from": critic_src,
           "dataset": ck["dataset_id"], "seed": cfg.seed, "policy_batch": cfg.policy_batch, "policy_lr": cfg.policy_lr,
           "ema_tau": cfg.ema_tau, "num_support": cfg.num_support, "backend": cfg.backend, "episodes": a.episodes,
           "eval_at": sorted(a.eval_at), "renew_every": a.renew_every or cfg.renew_every,
           "sample_steps": cfg.sample_steps, "variants": []}
    cached = False
    if a.cache and os.path.exists(a.cache):
        c = torch.load(a.cache)
        # caches from before --sample-steps existed were drawn with the checkpoint's own sampler steps
        same_steps = c.get("sample_steps", run_sample_steps) == cfg.sample_steps
        if c["ckpt"] == os.path.abspath(a.ckpt) and c["step"] == tr.step and same_steps:
            tr.support, tr.support_q, cached = c["support"], c["support_q"], True
            res["renew_cpu_s"] = c["cpu_s"]
            if c.get("critic") != a.critic_from:  # the same behaviour samples, scored by this critic
                tr.support_q = support_q(tr, tr.support)
    if not cached:
        t0 = cpu_s()
        tr._renew_support()
        res["renew_cpu_s"] = round(cpu_s() - t0, 1)
        if a.cache:
            os.makedirs(os.path.dirname(a.cache), exist_ok=True)
            torch.save({"ckpt": os.path.abspath(a.ckpt), "step": tr.step, "support": tr.support,
                        "support_q": tr.support_q, "critic": a.critic_from, "cpu_s": res["renew_cpu_s"],
                        "sample_steps": cfg.sample_steps},
                       a.cache + ".tmp")
            os.replace(a.cache + ".tmp", a.cache)
    res["support_cached"] = cached
    res["saturated_data"] = float((tr.dataset.actions.abs() >= SAT).float().mean())
    sup, q = tr.support, tr.support_q
    print(f"support ready ({res['renew_cpu_s']} CPU-s, cached={cached})", flush=True)
    res["behaviour"] = evaluate(tr, tr.P + tr.Q, a.episodes)
    print(f"behaviour model (EMA at step 0): {score_text(res['behaviour'])}",
          flush=True)
    if not a.skip_checks:
        res["support_stats"] = support_stats(tr, sup, q)
        res["grad_check"] = grad_check(tr, sup, q)
        res["sampler_check"] = sampler_check(tr, sup)
        print(json.dumps({k: res[k] for k in ("support_stats", "grad_check", "sampler_check")}, indent=1), flush=True)
    write(res, a.out)
    for name in a.variants:
        r = run_variant(tr, name, sup, q, a.steps, set(a.eval_at), a.episodes, a.seed, res["renew_every"],
                        on_point=lambda part: write({**res, "variants": res["variants"] + [part]}, a.out))
        res["variants"].append(r)
        write(res, a.out)
    if a.compare:
        res["compare"] = compare_checkpoints(a.compare, a.compare_episodes, tr.dataset)
        write(res, a.out)
    print(f"wrote {a.out}.md / .json")


if __name__ == "__main__":
    main()
