"""TD3+BC (Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021): a peer
baseline for issue 10's targets, written for this repository on the package's Trainer (same datasets, obs
normalisation, evaluation, CPU-time accounting and checkpoints as QIPO and CPQL). Not part of the package:
it answers "how far above the data does a standard offline RL method get on this dataset at this budget",
so a target missed by QIPO or CPQL can be read against what the data allows.

Per step (the paper's defaults, TD3BCConfig):
    critic:  a' = clip(pi'(s') + clip(N(0, policy_noise^2), -noise_clip, noise_clip), -1, 1)
             y = r + gamma (1 - d) min(Q1', Q2')(s', a');  loss = MSE(Q1, y) + MSE(Q2, y)
    every ``policy_freq`` steps:
             lambda = alpha / mean |Q1(s, pi(s))| (no gradient);  actor loss = -lambda mean Q1(s, pi(s)) + MSE(pi(s), a)
             targets: polyak with tau (actor and both critics)
    evaluation: the deterministic actor pi(s) (tanh output, [-1, 1]).
Networks: actor S-256-256-A (ReLU, tanh), twin critics (S+A)-256-256-1 (ReLU); Adam 3e-4; batch 256.
Observations are the dataset's normalised ones (the paper normalises states too); rewards use the
dataset's scaling (reward_scale "auto"), to which TD3+BC's actor loss is invariant (lambda divides by |Q|).

    python bench/time_to_score.py run --algo td3bc --dataset qipo/halfcheetah/medium-a2c-v0 --seed 0 --budget-s 1800
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_kernels import _checks as C  # noqa: E402
from qipo_kernels.algos.common import Trainer, polyak, seed_everything  # noqa: E402


@dataclass
class TD3BCConfig:
    """TD3+BC hyperparameters: the paper's values for the D4RL MuJoCo tasks."""
    hidden: int = 256
    lr: float = 3e-4
    batch: int = 256
    steps: int = 1_000_000
    gamma: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2          # target policy smoothing, in [-1, 1] action units
    noise_clip: float = 0.5
    policy_freq: int = 2               # actor and target updates every this many critic updates
    alpha: float = 2.5                 # weight of the Q term against behaviour cloning (lambda = alpha / |Q|)
    eval_every: int = 5_000
    eval_episodes: int = 10
    eval_seeds: tuple = (0,)
    log_every: int = 1_000
    checkpoint_every: int = 50_000
    tensorboard: bool = False
    seed: int = 0
    # accepted for the Trainer's shared fields; the networks are plain torch
    backend: str = "torch"
    compile: bool = False
    eval_candidates: int = 1
    eval_select: str = "argmax"

    def __post_init__(self):
        for name in ("hidden", "batch", "policy_freq", "log_every"):
            C.positive_int(name, getattr(self, name))
        for name in ("steps", "eval_every", "eval_episodes", "checkpoint_every"):
            C.positive_int(name, getattr(self, name), minimum=0)
        C.positive_float("lr", self.lr)
        C.positive_float("tau", self.tau)
        for name in ("policy_noise", "noise_clip", "alpha"):
            C.positive_float(name, getattr(self, name), allow_zero=True)
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        C.boolean("compile", self.compile)
        if self.compile:
            raise ValueError("compile=True is not supported by the TD3+BC peer; pass compile=False")
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


class Actor(nn.Module):
    """obs [n, S] -> action [n, A] in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = _mlp(obs_dim, hidden, act_dim)

    def forward(self, obs):
        return torch.tanh(self.net(obs))


class TwinCritic(nn.Module):
    """(obs [n, S], act [n, A]) -> (Q1 [n], Q2 [n])."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1 = _mlp(obs_dim + act_dim, hidden, 1)
        self.q2 = _mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, obs, act):
        x = torch.cat([obs, act], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def first(self, obs, act):
        """Q1 [n] alone (the actor's objective)."""
        return self.q1(torch.cat([obs, act], dim=-1)).squeeze(-1)


def td3bc_targets(critic_target, actor_target, next_obs, rewards, dones, noise, cfg: TD3BCConfig):
    """The critic's regression target y [B] (no gradient). ``noise`` [B, A] is a standard normal draw,
    scaled by policy_noise and clipped to +-noise_clip here."""
    with torch.no_grad():
        eps = (noise * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
        na = (actor_target(next_obs) + eps).clamp(-1.0, 1.0)
        q1, q2 = critic_target(next_obs, na)
        return rewards + cfg.gamma * (1.0 - dones) * torch.minimum(q1, q2)


def td3bc_actor_loss(critic, pi, act, alpha: float):
    """(loss, lambda): -lambda mean Q1(s, pi) + MSE(pi, a), lambda = alpha / mean |Q1(s, pi)| held constant.
    ``critic`` is a function pi -> Q1 [B]; ``pi`` [B, A] the actor's actions, ``act`` [B, A] the data's."""
    q = critic(pi)
    lam = alpha / q.abs().mean().detach().clamp_min(1e-8)
    return -lam * q.mean() + F.mse_loss(pi, act), lam


class TD3BC(Trainer):
    """TD3+BC on an OfflineDataset (normalised observations, actions in [-1, 1])."""

    algo = "td3bc"
    resume_fields = Trainer.resume_fields | {"steps"}
    lr_fields = {"lr": ("actor", "critic")}

    def __init__(self, dataset, cfg: Optional[TD3BCConfig] = None, out_dir: str = "runs/td3bc", device: str = "cpu",
                 progress_bar: bool = True, callback=None):
        cfg = cfg or TD3BCConfig()
        if not isinstance(cfg, TD3BCConfig):
            raise TypeError(f"cfg must be a TD3BCConfig, got {type(cfg).__name__}")
        Trainer.__init__(self, cfg, out_dir, device, progress_bar, callback)
        self.dataset = dataset
        seed_everything(cfg.seed)
        S, A = dataset.obs_dim, dataset.act_dim
        self.actor = Actor(S, A, cfg.hidden).to(self.device)
        self.critic = TwinCritic(S, A, cfg.hidden).to(self.device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        for m in (self.actor_target, self.critic_target):
            m.requires_grad_(False)
        self.modules = {"actor": self.actor, "critic": self.critic, "actor_target": self.actor_target,
                        "critic_target": self.critic_target}
        self.optims = {"actor": torch.optim.Adam(self.actor.parameters(), lr=cfg.lr),
                       "critic": torch.optim.Adam(self.critic.parameters(), lr=cfg.lr)}
        self.total_steps = cfg.steps
        self.N = len(dataset)
        self._last_actor = {}

    def train_step(self):
        cfg, d, g = self.cfg, self.dataset, self.gen
        idx = torch.randint(0, self.N, (cfg.batch,), generator=g, device=self.device)
        obs, act, rew, nobs, done = d.obs[idx], d.actions[idx], d.rewards[idx], d.next_obs[idx], d.terminations[idx]
        noise = torch.randn(act.shape, generator=g, device=self.device, dtype=act.dtype)
        y = td3bc_targets(self.critic_target, self.actor_target, nobs, rew, done, noise, cfg)
        q1, q2 = self.critic(obs, act)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.optims["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optims["critic"].step()
        metrics = {"critic_loss": critic_loss.detach(), "q_mean": q1.detach().mean()}
        if (self.step + 1) % cfg.policy_freq == 0:
            pi = self.actor(obs)
            actor_loss, lam = td3bc_actor_loss(lambda a: self.critic.first(obs, a), pi, act, cfg.alpha)
            self.optims["actor"].zero_grad(set_to_none=True)
            actor_loss.backward()
            self.optims["actor"].step()   # the critic's gradients from this loss are cleared before its next step
            polyak(self.actor_target, self.actor, cfg.tau)
            polyak(self.critic_target, self.critic, cfg.tau)
            self._last_actor = {"actor_loss": actor_loss.detach(), "lambda": lam}
        metrics.update(self._last_actor)
        return metrics, cfg.batch

    def policy_fn(self):
        """obs [n, S] (normalised) -> the deterministic actor's actions [n, A] in [-1, 1]."""
        @torch.no_grad()
        def fn(obs):
            return self.actor(obs.to(self.device, torch.float32))
        return fn

    def evaluate(self, num_episodes: Optional[int] = None, seeds=None):
        from qipo_kernels.evaluation import evaluate

        return evaluate(self.policy_fn(), dataset=self.dataset, num_episodes=num_episodes or self.cfg.eval_episodes,
                        seeds=tuple(seeds) if seeds is not None else self.cfg.eval_seeds)
