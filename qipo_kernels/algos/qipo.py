"""QIPO: energy-weighted flow matching for offline RL (Zhang, Zhang, Gu, ICLR 2025).

Three stages over one global step counter (see /work/shared/ALGORITHMS.md section 1):

1. behaviour pre-training, steps [0, P): plain (unweighted) flow-matching loss on dataset actions.
2. in-support softmax Q learning, steps [P, P + Q): for every next state M behaviour samples
   (refreshed every ``q_support_refresh`` steps); V(s') = sum_j softmax_j(q_alpha Q'(s', a'_j)) Q'(s', a'_j)
   with Q' = min of the twin target critics; y = r + gamma (1 - d) V(s'); twin Q by MSE; Polyak tau.
3. policy improvement, steps [P + Q, P + Q + I): the policy starts from the behaviour model; every
   ``renew_every`` steps, M support actions per dataset state are re-sampled from an EMA copy of the
   policy (the batched fast sampler, in chunks) and scored once by the frozen critic; the loss is the
   energy-weighted FM loss with weights softmax_j(beta min(Q1, Q2)) over each state's support
   (``normalize="support"``, official code) or over the batch (``"batch"``, the paper's Algorithm 1).
   ``keep_data_action`` puts the dataset action in slot 0 of every support set (Algorithm 2).
   ``support_estimator="sampled"`` (not the paper's) estimates the same loss from one support action per
   state drawn by its weight.

Networks: the policy / behaviour model is a ConditionalMLP (Gaussian Fourier time features, as QGPO's
ScoreNet; the official U-Net-shaped residual MLP is not reproduced), the critic a twin ReLU MLP.
Paths: "ot" (velocity), "ot-eps" (noise on the OT path, the official QIPO-OT) and "vp" (QIPO-Diff).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .. import _checks as C
from ..nets import DoubleCritic
from ..policies import FlowPolicy
from ..reference.loss import draw_weighted_pairs
from ..reference.ode import NOISE_SOLVERS, VELOCITY_SOLVERS
from ..reference.paths import PATHS
from .common import Trainer, hard_update, polyak, progress, seed_everything
from .distributed import block_noise, flow_loss, gather_rows, shard_range, stream_id


@dataclass
class QIPOConfig:
    """QIPO hyperparameters; defaults are the official code's (steps = epochs x 1000)."""
    # networks
    path: str = "ot-eps"
    hidden: int = 256
    depth: int = 3
    activation: str = "mish"
    time_embedding: str = "fourier"
    critic_hidden: int = 256
    critic_depth: int = 3
    critic_activation: str = "relu"
    # sampling (support renewal, Q-learning support, evaluation)
    solver: Optional[str] = None      # None: "euler" on "ot", "dpm2" (DPM-Solver++(2S)) on noise paths
    sample_steps: int = 8             # dpm2: 2 evaluations per step (16 network evaluations ~ official 15)
    sample_t0: Optional[float] = None  # sampling start time; None: 0.05 on "ot-eps" (see FlowPolicy), 0 otherwise
    # stage 1: behaviour pre-training
    pretrain_steps: int = 600_000
    pretrain_batch: int = 4096
    pretrain_lr: float = 1e-4
    # stage 2: in-support softmax Q learning
    q_steps: int = 500_000
    q_batch: int = 256
    q_lr: float = 3e-4
    q_support: int = 64               # M behaviour samples per next state
    q_support_refresh: int = 100_000  # re-sample them every this many Q steps
    q_alpha: float = 1.0              # 1 locomotion, 20 AntMaze
    gamma: float = 0.99
    tau: float = 0.005
    # stage 3: policy improvement
    policy_steps: int = 100_000
    policy_batch: int = 256
    policy_lr: float = 1e-4
    num_support: int = 64             # M support actions per dataset state
    renew_every: int = 10_000         # K_renew
    ema_tau: float = 0.005
    beta: float = 3.0
    normalize: str = "support"        # "support" (official code) | "batch" (paper's Algorithm 1)
    keep_data_action: bool = False
    # "full": the loss on all M support actions of each state (official code, paper); "sampled": one
    # support action per state drawn with probability of its weight (reference.loss.draw_weighted_pairs),
    # plain FM on those: the same loss and gradient in expectation, 1/M of the network rows per state (not
    # the paper's; pair it with a larger policy_batch: bench/results/qipo_stage3_findings.md section 11)
    support_estimator: str = "full"
    # sigma of FlowPolicy.loss' bound_dequant for every flow-matching target (stage-1 data actions, stage-3
    # support actions): a coordinate at the bound (|a| = 1, where the env clips) is trained on as
    # sign(a) (1 + sigma |z|), so the model keeps the data's at-bound mass (the sampler's clamp puts it back
    # on the bound). 0: off (the papers). Not the paper's; measured in bench/results/tts-stage1/NOTES.md
    bound_dequant: float = 0.0
    renew_chunk: int = 4096           # states per batched sampler call during renewal
    # Support sets are kept in checkpoints only up to this many numbers (4 MB of float32): larger ones
    # (100k states x 64 x A: ~160 MB) are re-drawn from the restored networks on resume instead (a
    # fresh draw, so such a resumed run is not bit-identical to an uninterrupted one).
    store_support_max: int = 1_000_000
    # data
    reward_scale: Any = "auto"
    normalize_obs: bool = True
    # evaluation / logging
    eval_every: int = 5_000
    eval_episodes: int = 10
    eval_seeds: tuple = (0,)
    eval_candidates: int = 1          # 1: one sample per state (official); K > 1: argmax min-Q of K
    # initial-noise scale of the evaluation sampler (FlowPolicy.sample's noise_scale): 1 = the official
    # evaluation; 0 = the deterministic ODE from the origin. Not the paper's: qipo_noise_scale.md
    eval_noise_scale: float = 1.0
    log_every: int = 100
    checkpoint_every: int = 10_000
    tensorboard: bool = True
    seed: int = 0
    backend: str = "auto"
    # torch.compile the trained networks' forward (Trainer.compile_networks; not the algorithm: speed only)
    compile: bool = False

    def __post_init__(self):
        C.choice("path", self.path, PATHS)
        if self.solver is not None:
            C.choice("solver", self.solver, VELOCITY_SOLVERS if self.path == "ot" else NOISE_SOLVERS)
        C.choice("normalize", self.normalize, ("support", "batch"))
        C.choice("support_estimator", self.support_estimator, ("full", "sampled"))
        C.boolean("keep_data_action", self.keep_data_action)
        for name in ("hidden", "depth", "critic_hidden", "critic_depth", "sample_steps", "pretrain_batch", "q_batch",
                     "q_support", "q_support_refresh", "policy_batch", "num_support", "renew_every", "renew_chunk",
                     "log_every"):
            C.positive_int(name, getattr(self, name))
        for name in ("pretrain_steps", "q_steps", "policy_steps", "eval_every", "eval_episodes", "checkpoint_every"):
            C.positive_int(name, getattr(self, name), minimum=0)
        for name in ("pretrain_lr", "q_lr", "policy_lr", "tau", "ema_tau", "beta", "q_alpha"):
            C.positive_float(name, getattr(self, name))
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        C.positive_int("eval_candidates", self.eval_candidates)
        self.eval_noise_scale = C.positive_float("eval_noise_scale", self.eval_noise_scale, allow_zero=True)
        self.bound_dequant = C.positive_float("bound_dequant", self.bound_dequant, allow_zero=True)
        C.boolean("compile", self.compile)
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)


# Documented presets: they change only schedule lengths, batch sizes and learning rates (the papers'
# values stay QIPOConfig's defaults). "cpu-quick": a run of ~8-15 CPU-minutes on one thread (100k transitions);
# lr 1e-3 for the behaviour model (bench/results/qipo_bc_diagnosis.md: R^2 0.50 vs 0.43 at 1e-4 after
# 1,000 steps of batch 1024); one support draw per stage (each is a full-dataset sampling pass).
# "cpu-30min": about 25 CPU-minutes on one thread on ~36k transitions (walker2d noisy-sac), measured costs:
# stage 1 ~0.023 s/step at batch 1024; each full-dataset sampling pass (64 actions x 16 network
# evaluations per state) ~107 s, plus ~60 s to score a renewed support with the critic; a Q step ~0.1 s at
# batch 128 (the target critic runs on 128 x 64 next actions); a policy step ~0.15 s at batch 128 (x 64
# support actions). Stage 1 gets 12k steps (the behaviour model's R^2 and BC score still grow at 6k steps:
# bench/results/qipo_bc_steps_walker2d_*.md), the critic 4k steps (CPQL needs ~3k to beat the data), one
# Q-support draw, two support renewals in stage 3.
QIPO_PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu-quick": dict(pretrain_steps=1000, pretrain_batch=1024, pretrain_lr=1e-3, q_steps=1000,
                      q_support_refresh=1000, policy_steps=500, renew_every=500),
    "cpu-30min": dict(pretrain_steps=12_000, pretrain_batch=1024, pretrain_lr=1e-3, q_steps=4000, q_batch=128,
                      q_support_refresh=4000, policy_steps=2000, policy_batch=128, policy_lr=3e-4,
                      renew_every=1000),
}


def qipo_config_for(preset: Optional[str] = None, **overrides) -> QIPOConfig:
    """QIPOConfig with a preset from QIPO_PRESETS (None: the defaults), then ``overrides``."""
    if preset is not None and preset not in QIPO_PRESETS:
        raise ValueError(f"preset must be one of {sorted(QIPO_PRESETS)} or None, got {preset!r}")
    d = dict(QIPO_PRESETS.get(preset, {}))
    d.update(overrides)
    return QIPOConfig(**d)


class QIPO(Trainer):
    """QIPO trainer on an OfflineDataset (qipo_kernels.data). ``fit()`` runs all three stages."""

    algo = "qipo"
    # may change on resume: the length of the last stage, memory knobs, the learning rates
    resume_fields = Trainer.resume_fields | {"policy_steps", "store_support_max", "renew_chunk", "eval_noise_scale"}
    lr_fields = {"pretrain_lr": ("behaviour",), "q_lr": ("critic",), "policy_lr": ("policy",)}
    dist_batches = ("pretrain_batch", "q_batch", "policy_batch")

    def __init__(self, dataset, cfg: Optional[QIPOConfig] = None, out_dir: str = "runs/qipo", device: str = "cpu",
                 progress_bar: bool = True, callback=None):
        cfg = cfg or QIPOConfig()
        if not isinstance(cfg, QIPOConfig):
            raise TypeError(f"cfg must be a QIPOConfig, got {type(cfg).__name__}")
        super().__init__(cfg, out_dir, device, progress_bar, callback)
        self.dataset = dataset
        seed_everything(cfg.seed)
        S, A = dataset.obs_dim, dataset.act_dim
        mk = dict(hidden=cfg.hidden, depth=cfg.depth, activation=cfg.activation, time_embedding=cfg.time_embedding,
                  path=cfg.path, steps=cfg.sample_steps, solver=cfg.solver, t0=cfg.sample_t0)
        self.behaviour = FlowPolicy(S, A, **mk).to(self.device)
        self.policy = FlowPolicy(S, A, **mk).to(self.device)
        self.ema = copy.deepcopy(self.policy).requires_grad_(False)
        self.critic = DoubleCritic(S, A, cfg.critic_hidden, cfg.critic_depth, cfg.critic_activation).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.modules = {"behaviour": self.behaviour, "policy": self.policy, "ema": self.ema, "critic": self.critic,
                        "critic_target": self.critic_target}
        self.optims = {
            "behaviour": torch.optim.Adam(self.behaviour.parameters(), lr=cfg.pretrain_lr),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=cfg.q_lr),
            "policy": torch.optim.Adam(self.policy.parameters(), lr=cfg.policy_lr),
        }
        self.P, self.Q, self.I = cfg.pretrain_steps, cfg.q_steps, cfg.policy_steps
        self.total_steps = self.P + self.Q + self.I
        self.q_support_actions: Optional[torch.Tensor] = None   # [N, Mq, A] behaviour samples at next_obs
        self.support: Optional[torch.Tensor] = None             # [N, M, A] policy-improvement support
        self.support_q: Optional[torch.Tensor] = None           # [N, M] min Q of the support
        self._q_support_step = -1                               # step at which each was last drawn
        self._support_step = -1
        self.N = len(dataset)
        self._eval_gen = torch.Generator(device=self.device)

    # ---- helpers ------------------------------------------------------------------------------
    def stage(self) -> str:
        if self.step < self.P:
            return "pretrain"
        if self.step < self.P + self.Q:
            return "q"
        return "policy"

    def _idx(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.N, (n,), generator=self.gen, device=self.device)

    @torch.no_grad()
    def sample_support(self, policy: FlowPolicy, obs: torch.Tensor, M: int, desc: str, critic=None):
        """M actions per state from ``policy`` with the batched sampler (ops.integrate on [B, M, A] noise,
        backend=cfg.backend), in chunks of ``renew_chunk`` states: obs [N, S] -> ([N, M, A], [N, M] min Q or None).

        The noise of state i depends only on (seed, desc, step, i) (distributed.block_noise), so under
        torch.distributed each rank samples its own range of states and the gathered result is the
        one-process result."""
        N, A = obs.shape[0], policy.act_dim
        lo, hi = shard_range(self, N)
        out = torch.empty((hi - lo, M, A), dtype=obs.dtype, device=obs.device)
        q = torch.empty((hi - lo, M), dtype=obs.dtype, device=obs.device) if critic is not None else None
        chunk, key = self.cfg.renew_chunk, (int(self.cfg.seed), stream_id(desc), self.step)
        starts = range(lo, hi, chunk)
        bar = progress(starts, total=len(starts), desc=desc, enabled=self.progress_bar, leave=False)
        for i in bar:
            j = min(i + chunk, hi)
            o = obs[i:j]
            noise = block_noise(key, i, j, (M, A), obs.dtype, obs.device)
            a = policy.sample(o, M, noise=noise, backend=self.cfg.backend)
            out[i - lo:j - lo] = a
            if critic is not None:
                q[i - lo:j - lo] = critic.q_min(o.repeat_interleave(M, 0), a.reshape(-1, A)).reshape(-1, M)
        bar.close()
        return gather_rows(self, out, N), gather_rows(self, q, N)

    def _refresh_q_support(self):
        self.q_support_actions, _ = self.sample_support(self.behaviour, self.dataset.next_obs, self.cfg.q_support,
                                                        "q-support")
        self._q_support_step = self.step

    def _renew_support(self):
        obs = self.dataset.obs
        M = self.cfg.num_support
        sup, q = self.sample_support(self.ema, obs, M, "renew-support", critic=self.critic)
        if self.cfg.keep_data_action:
            sup[:, 0] = self.dataset.actions
            with torch.no_grad():
                q[:, 0] = self.critic.q_min(obs, self.dataset.actions)
        self.support, self.support_q = sup, q
        self._support_step = self.step

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self):
        cfg, d = self.cfg, self.dataset
        s = self.step
        if s < self.P:  # behaviour pre-training
            idx = self._idx(cfg.pretrain_batch)
            loss = flow_loss(self, self.behaviour, d.obs[idx], d.actions[idx], bound_dequant=cfg.bound_dequant)
            self.optims["behaviour"].zero_grad(set_to_none=True)
            loss.backward()
            self.optims["behaviour"].step()
            return {"bc_loss": loss.detach()}, cfg.pretrain_batch
        if s < self.P + self.Q:  # in-support softmax Q learning
            k = s - self.P
            if k % cfg.q_support_refresh == 0 or self.q_support_actions is None:
                self._refresh_q_support()
            idx = self.rows(self._idx(cfg.q_batch))  # this process's share of the global batch
            obs, act, rew = d.obs[idx], d.actions[idx], d.rewards[idx]
            nobs, done = d.next_obs[idx], d.terminations[idx]
            Mq = cfg.q_support
            with torch.no_grad():
                na = self.q_support_actions[idx]                                  # [B, Mq, A]
                qn = self.critic_target.q_min(nobs.repeat_interleave(Mq, 0), na.reshape(-1, d.act_dim)).reshape(-1, Mq)
                v = (torch.softmax(cfg.q_alpha * qn, dim=1) * qn).sum(1)
                y = rew + cfg.gamma * (1.0 - done) * v
            q1, q2 = self.train_call(self.critic, lambda m: m(obs, act))
            loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
            self.optims["critic"].zero_grad(set_to_none=True)
            loss.backward()
            self.optims["critic"].step()
            polyak(self.critic_target, self.critic, cfg.tau)
            return {"q_loss": loss.detach(), "q_mean": q1.detach().mean()}, cfg.q_batch * (1 + Mq)
        # policy improvement
        k = s - self.P - self.Q
        if k == 0:
            hard_update(self.policy, self.behaviour)
            hard_update(self.ema, self.behaviour)
            self.q_support_actions = None  # not needed any more
        if k % cfg.renew_every == 0 or self.support is None:
            self._renew_support()
        idx = self._idx(cfg.policy_batch)
        if cfg.support_estimator == "sampled":  # one weight-drawn (state, support action) pair per batch row
            rows, cols = draw_weighted_pairs(self.support_q[idx], cfg.beta, cfg.normalize, generator=self.gen)
            sidx = idx[rows]
            loss = flow_loss(self, self.policy, d.obs[sidx], self.support[sidx, cols], bound_dequant=cfg.bound_dequant)
            n = cfg.policy_batch
        else:
            loss = flow_loss(self, self.policy, d.obs[idx], self.support[idx], energy=self.support_q[idx],
                             beta=cfg.beta, normalize=cfg.normalize, backend=cfg.backend,
                             bound_dequant=cfg.bound_dequant)
            n = cfg.policy_batch * cfg.num_support
        self.optims["policy"].zero_grad(set_to_none=True)
        loss.backward()
        self.optims["policy"].step()
        polyak(self.ema, self.policy, cfg.ema_tau)
        return {"policy_loss": loss.detach()}, n

    # ---- state beyond modules / optimizers -----------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        st: Dict[str, Any] = {"q_support_step": self._q_support_step, "support_step": self._support_step}
        lim = self.cfg.store_support_max
        if self.q_support_actions is not None and self.q_support_actions.numel() <= lim:
            st["q_support_actions"] = self.q_support_actions
        if self.support is not None and self.support.numel() + self.support_q.numel() <= lim:
            st["support"], st["support_q"] = self.support, self.support_q
        return st

    def _load_state(self, st: Dict[str, Any]) -> None:
        self._q_support_step = st.get("q_support_step", -1)
        self._support_step = st.get("support_step", -1)
        self.q_support_actions = st.get("q_support_actions")
        self.support, self.support_q = st.get("support"), st.get("support_q")
        # A support set too large to store is regenerated now, from the restored networks: the run
        # then goes on with a fresh draw (nothing lost; not bit-identical to an uninterrupted run).
        stage = self.stage()
        if stage == "q" and self.q_support_actions is None and self.step > self.P:
            self._refresh_q_support()
        if stage == "policy" and self.support is None and self.step > self.P + self.Q:
            self._renew_support()

    # ---- evaluation ----------------------------------------------------------------------------
    def policy_fn(self, policy: Optional[FlowPolicy] = None):
        """obs [n, S] (normalised) -> actions [n, A]: one sample per state from the EMA policy, or the
        argmax-min-Q of ``eval_candidates`` samples when that is > 1."""
        pol = policy if policy is not None else (self.ema if self.step > self.P + self.Q else self.behaviour)
        K, gen, ns = self.cfg.eval_candidates, self._eval_gen, self.cfg.eval_noise_scale

        @torch.no_grad()
        def fn(obs):
            obs = obs.to(self.device, torch.float32)
            if K > 1:
                return pol.act(obs, self.critic, num_candidates=K, select="argmax", generator=gen,
                               backend=self.cfg.backend, noise_scale=ns)
            return pol.sample(obs, 1, generator=gen, backend=self.cfg.backend, noise_scale=ns)[:, 0]
        return fn

    def should_eval(self) -> bool:
        return self.step > self.P + self.Q  # evaluate during policy improvement, as the official code

    def evaluate(self, num_episodes: Optional[int] = None, seeds=None, policy: Optional[FlowPolicy] = None):
        from ..evaluation import evaluate

        self._eval_gen.manual_seed(int(self.cfg.seed) + 7919 * (self.step + 1))
        return evaluate(self.policy_fn(policy), dataset=self.dataset,
                        num_episodes=num_episodes or self.cfg.eval_episodes,
                        seeds=tuple(seeds) if seeds is not None else self.cfg.eval_seeds)
