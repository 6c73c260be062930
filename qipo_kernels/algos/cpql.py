"""CPQL: Consistency Policy with Q-Learning (Chen, Li, Zhao, AAMAS 2024), offline and online.

Offline (``CPQL``), per step (official code, agents/ql_cm.py):
    critic:  y = r + gamma (1 - d) min(Q1', Q2')(s', a'),  a' = pi(s') one-step sample (current actor);
             max-Q backup (AntMaze): 10 samples per s', max per head, min across heads.
             loss = MSE(Q1, y) + MSE(Q2, y); grad-norm clip.
    actor:   recon = Karras-weighted consistency reconstruction loss;
             q_loss = -Q1(s, pi(s)).mean() / |Q2(s, pi(s))|.mean().detach() (Q1/Q2 swapped at random);
             loss = alpha recon + eta q_loss  (alpha = 1); grad-norm clip.
    targets: every ``update_ema_every`` steps: copy before ``step_start_ema``, then EMA with decay 0.995
             (actor and critic targets).
    evaluation: 50 candidates per state, one drawn by softmax(min Q of the target critic).
Online (``CPQLOnline``): gymnasium env loop with a ReplayBuffer, ``warmup_steps`` uniform random
actions, one update per env step after warm-up, actor loss alpha recon - eta min(Q1, Q2).mean(),
alpha = 0.05, no LayerNorm.

``CPQL_TASK_DEFAULTS`` holds the paper's per-task (lr, eta, grad_norm, epochs) by task name, e.g.
"halfcheetah-medium"; ``cpql_config_for(dataset_id)`` builds a config from it.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import _checks as C
from ..nets import DoubleCritic
from ..policies import ConsistencyPolicy
from ..reference.consistency import cpql_multistep_sigmas
from .common import Trainer, hard_update, polyak, seed_everything
from .distributed import rank_mean

# task -> (lr, eta, grad_norm, epochs of 1000 steps); AntMaze also uses max-Q backup and (r - 0.5) * 4.
CPQL_TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {}


def _add(env, kinds, lrs, etas, gns, epochs, **extra):
    for kind, lr, eta, gn in zip(kinds, lrs, etas, gns):
        d = dict(lr=lr, eta=eta, epochs=epochs, **extra)
        if gn is not None:
            d["grad_norm"] = gn
        CPQL_TASK_DEFAULTS[f"{env}-{kind}"] = d


_add("halfcheetah", ["medium", "medium-replay", "medium-expert"], [3e-4] * 3, [2.0, 2.0, 1.0], [9.0, 2.0, 8.0], 2000)
_add("hopper", ["medium", "medium-replay", "medium-expert"], [3e-4] * 3, [2.0, 1.0, 0.5], [9.0, 4.0, 5.0], 2000)
_add("walker2d", ["medium", "medium-replay", "medium-expert"], [3e-4] * 3, [1.0, 1.0, 1.0], [1.0, 4.0, 5.0], 2000)
_add("antmaze", ["umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"],
     [3e-4, 3e-4, 1e-3, 3e-4, 3e-4, 3e-4], [1.0, 2.0, 4.0, 3.0, 4.5, 3.5], [2.0, 3.0, 2.0, 1.0, 10.0, 7.0], 1000,
     max_q_backup=True, reward_scale="cpql-antmaze",
     # the official code samples multistep on AntMaze (main.py: args.sampler = 'multistep'), everywhere it samples
     sigmas=tuple(cpql_multistep_sigmas()))
# ALGORITHMS.md gives no grad-norm clip for pen: the config's default applies.
_add("pen", ["human", "cloned"], [3e-5, 3e-5], [0.15, 0.1], [None, None], 1000)


def task_key(dataset_id: str) -> Optional[str]:
    """'mujoco/halfcheetah/medium-v0' or 'halfcheetah-medium-v2' -> 'halfcheetah-medium' (None if unknown)."""
    s = dataset_id.lower().strip()
    s = re.sub(r"-v\d+$", "", s)
    parts = [p for p in s.split("/") if p]
    if len(parts) >= 2 and parts[0] in ("mujoco", "d4rl"):
        parts = parts[1:]
    key = "-".join(parts)
    key = key.replace("_", "-")
    key = re.sub(r"^antmaze-(\w+)-(play|diverse)$", r"antmaze-\1-\2", key)
    key = key.replace("antmaze-umaze-v", "antmaze-umaze")
    return key if key in CPQL_TASK_DEFAULTS else None


@dataclass
class CPQLConfig:
    """Offline CPQL hyperparameters (official defaults; per-task values in CPQL_TASK_DEFAULTS)."""
    hidden: int = 256
    depth: int = 3
    critic_hidden: int = 256
    critic_depth: int = 3
    layer_norm: bool = True           # LayerNorm in the critic (offline)
    lr: float = 3e-4
    # cosine decay of both learning rates from lr to 0 over ``steps`` (the official code's --lr_decay,
    # off in its runs): lr(step) = lr (1 + cos(pi step / steps)) / 2
    lr_decay: bool = False
    eta: float = 1.0
    alpha: float = 1.0                # weight of the reconstruction loss
    grad_norm: float = 5.0            # <= 0 disables clipping
    steps: int = 1_000_000            # epochs x 1000
    batch: int = 256
    gamma: float = 0.99
    ema_decay: float = 0.995
    update_ema_every: int = 5
    step_start_ema: int = 1000
    max_q_backup: bool = False
    num_max_q: int = 10
    num_scales: int = 40
    q_norm: bool = True               # q_loss = -Q1 / |Q2|.mean() (offline); False: -min(Q1, Q2).mean()
    sigmas: Optional[tuple] = None    # multistep sampling noise levels (None: one step)
    reward_scale: Any = "auto"
    normalize_obs: bool = True
    eval_every: int = 50_000
    eval_episodes: int = 10
    eval_seeds: tuple = (0,)
    eval_candidates: int = 50
    eval_select: str = "softmax"
    log_every: int = 100
    checkpoint_every: int = 10_000
    tensorboard: bool = True
    seed: int = 0
    backend: str = "auto"
    # torch.compile the trained networks' forward (Trainer.compile_networks; not the algorithm: speed only)
    compile: bool = False
    task: Optional[str] = None        # informational: the per-task defaults applied

    def __post_init__(self):
        for name in ("hidden", "depth", "critic_hidden", "critic_depth", "batch", "update_ema_every", "num_max_q",
                     "eval_candidates", "log_every"):
            C.positive_int(name, getattr(self, name))
        C.boolean("compile", self.compile)
        C.boolean("lr_decay", self.lr_decay)
        C.positive_int("num_scales", self.num_scales, minimum=2)
        for name in ("steps", "step_start_ema", "eval_every", "eval_episodes", "checkpoint_every"):
            C.positive_int(name, getattr(self, name), minimum=0)
        C.positive_float("lr", self.lr)
        C.positive_float("eta", self.eta, allow_zero=True)
        C.positive_float("alpha", self.alpha, allow_zero=True)
        C.positive_float("grad_norm", self.grad_norm, allow_zero=True)
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        C.choice("eval_select", self.eval_select, ("argmax", "softmax"))
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)
        if self.sigmas is not None:
            self.sigmas = tuple(float(s) for s in self.sigmas)


def preset_message(dataset_id: str) -> str:
    """One line saying which CPQL preset a dataset id selects: its task's defaults, or (an id that
    matches no task in CPQL_TASK_DEFAULTS) the generic CPQLConfig defaults, named with their values."""
    key = task_key(dataset_id)
    if key is not None:
        return f"using CPQL defaults for task {key!r} (from dataset {dataset_id!r})"
    c = CPQLConfig()
    return (f"dataset {dataset_id!r} matches no CPQL task preset: using the generic CPQLConfig defaults "
            f"(lr {c.lr:g}, eta {c.eta:g}, grad_norm {c.grad_norm:g}, steps {c.steps}); choose one with --task "
            f"(known: {', '.join(sorted(CPQL_TASK_DEFAULTS))}) or --set")


def cpql_config_for(dataset_id_or_task: str, **overrides) -> CPQLConfig:
    """CPQLConfig with the paper's per-task defaults (lr, eta, grad_norm, steps = epochs x 1000, AntMaze
    max-Q backup and reward), then ``overrides``. Unknown tasks raise ValueError listing the known ones."""
    key = dataset_id_or_task if dataset_id_or_task in CPQL_TASK_DEFAULTS else task_key(dataset_id_or_task)
    if key is None:
        raise ValueError(f"no CPQL defaults for {dataset_id_or_task!r}; known tasks: {sorted(CPQL_TASK_DEFAULTS)}")
    d = dict(CPQL_TASK_DEFAULTS[key])
    d["steps"] = d.pop("epochs") * 1000
    d["task"] = key
    d.update(overrides)
    from .common import config_from_dict

    return config_from_dict(CPQLConfig, d)


def _clip(params, max_norm: float):
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.tensor(float("nan"))


class _CPQLCore:
    """Networks and the update shared by offline and online CPQL."""

    def _build(self, S: int, A: int, cfg, layer_norm: bool):
        self.actor = ConsistencyPolicy(S, A, hidden=cfg.hidden, depth=cfg.depth, num_scales=cfg.num_scales).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = DoubleCritic(S, A, cfg.critic_hidden, cfg.critic_depth, "mish", layer_norm=layer_norm).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.modules = {"actor": self.actor, "actor_target": self.actor_target, "critic": self.critic,
                        "critic_target": self.critic_target}
        self.optims = {"actor": torch.optim.Adam(self.actor.parameters(), lr=cfg.lr),
                       "critic": torch.optim.Adam(self.critic.parameters(), lr=cfg.lr)}
        self.act_dim = A

    def _draws(self, B: int, online: bool, dtype: torch.dtype) -> Dict[str, Any]:
        """Every random number of one update on a (global) batch of B, drawn from the training generator
        in the order the samplers and the loss would draw them themselves."""
        cfg, g, A = self.cfg, self.gen, self.act_dim
        kw = dict(device=self.device, dtype=dtype)
        maxq = getattr(cfg, "max_q_backup", False)
        K = cfg.num_max_q if maxq else 1
        r: Dict[str, Any] = {"next": torch.randn((B, K, A), **kw, generator=g), "next_steps": None,
                             "new_steps": None}
        if cfg.sigmas:  # multistep: the re-noise of each extra step (backup and actor samples alike)
            r["next_steps"] = torch.randn((len(cfg.sigmas), B, K, A), **kw, generator=g)
        r["sigma_idx"] = torch.randint(0, self.actor.num_scales - 1, (B,), device=self.device, generator=g)
        r["recon"] = torch.randn((B, A), **kw, generator=g)
        r["new"] = torch.randn((B, 1, A), **kw, generator=g)
        if cfg.sigmas:
            r["new_steps"] = torch.randn((len(cfg.sigmas), B, 1, A), **kw, generator=g)
        r["swap"] = None
        if cfg.q_norm and not online:
            r["swap"] = float(torch.rand((), generator=g, device=self.device)) > 0.5
        return r

    def scheduled_lr(self, step: int) -> float:
        """The learning rate of both optimizers at ``step``: ``cfg.lr``, or with ``cfg.lr_decay`` the cosine
        cfg.lr (1 + cos(pi step / total_steps)) / 2 (0 from total_steps on). A function of the step alone,
        so a resumed run follows the same schedule (a resume with more steps stretches what is left)."""
        cfg = self.cfg
        if not cfg.lr_decay:
            return float(cfg.lr)
        frac = min(step / max(self.total_steps, 1), 1.0)
        return float(cfg.lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _apply_resume_changes(self, changes: Dict[str, tuple]) -> None:
        """The Trainer's, then the optimizers' lr set to this step's scheduled value: a checkpoint's optimizers
        hold the lr they last used, which a resume that turns lr_decay off must not keep."""
        super()._apply_resume_changes(changes)
        self._set_lr(self.scheduled_lr(self.step))

    def _set_lr(self, lr: float) -> None:
        for o in self.optims.values():
            for group in o.param_groups:
                group["lr"] = lr

    def _update(self, batch: Dict[str, torch.Tensor], online: bool) -> Dict[str, torch.Tensor]:
        """One critic + actor update on a global batch; under torch.distributed on this process's share of it
        (same random draws as one process, gradients averaged by DDP, the |Q| normaliser global)."""
        cfg = self.cfg
        if cfg.lr_decay:
            lr = self.scheduled_lr(self.step)
            self._set_lr(lr)
        z = self._draws(batch["obs"].shape[0], online, batch["obs"].dtype)
        obs, act, rew, nobs, done = (self.rows(batch[k]) for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        zn, zr, zs, za = self.rows(z["next"]), self.rows(z["recon"]), self.rows(z["sigma_idx"]), self.rows(z["new"])
        zsteps, zasteps = (None if z[k] is None else self.rows(z[k].transpose(0, 1)).transpose(0, 1)
                           for k in ("next_steps", "new_steps"))
        B = obs.shape[0]
        # critic
        with torch.no_grad():
            if getattr(cfg, "max_q_backup", False):
                K = cfg.num_max_q
                na = self.actor.sample(nobs, K, sigmas=cfg.sigmas, noise=zn, step_noise=zsteps,
                                       backend=cfg.backend)                                  # [B, K, A]
                q1n, q2n = self.critic_target(nobs.repeat_interleave(K, 0), na.reshape(-1, self.act_dim))
                qn = torch.minimum(q1n.reshape(B, K).max(1).values, q2n.reshape(B, K).max(1).values)
            else:
                na = self.actor.sample(nobs, 1, sigmas=cfg.sigmas, noise=zn, step_noise=zsteps,
                                       backend=cfg.backend)[:, 0]
                qn = self.critic_target.q_min(nobs, na)
            y = rew + cfg.gamma * (1.0 - done) * qn
        q1, q2 = self.train_call(self.critic, lambda m: m(obs, act))
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.optims["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        cgn = _clip(self.critic.parameters(), cfg.grad_norm)
        self.optims["critic"].step()
        # actor (the reconstruction loss and the differentiable sample, one-step or multistep where the
        # official code samples multistep, in one DDP forward)
        recon, new_a = self.train_call(self.actor, lambda m: (m.loss(obs, act, sigma_idx=zs, noise=zr),
                                                              m.sample(obs, 1, sigmas=cfg.sigmas, noise=za,
                                                                       step_noise=zasteps, backend="torch")[:, 0]))
        nq1, nq2 = self.critic(obs, new_a)  # the critic's own gradients from here are discarded below
        if z["swap"] is not None:
            if z["swap"]:
                q_loss = -nq1.mean() / rank_mean(self, nq2.abs()).detach()
            else:
                q_loss = -nq2.mean() / rank_mean(self, nq1.abs()).detach()
        else:
            q_loss = -torch.minimum(nq1, nq2).mean()
        actor_loss = cfg.alpha * recon + cfg.eta * q_loss
        self.optims["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        agn = _clip(self.actor.parameters(), cfg.grad_norm)
        self.optims["actor"].step()
        self.critic.zero_grad(set_to_none=True)  # the actor loss left gradients in the critic
        # targets
        n = self.updates + 1
        if n % cfg.update_ema_every == 0:
            if n < cfg.step_start_ema:
                hard_update(self.actor_target, self.actor)
                hard_update(self.critic_target, self.critic)
            else:
                polyak(self.actor_target, self.actor, 1.0 - cfg.ema_decay)
                polyak(self.critic_target, self.critic, 1.0 - cfg.ema_decay)
        self.updates = n
        out = {"critic_loss": critic_loss.detach(), "recon": recon.detach(), "q_loss": q_loss.detach(),
               "actor_loss": actor_loss.detach(), "q_mean": q1.detach().mean(), "actor_gn": agn, "critic_gn": cgn}
        if cfg.lr_decay:
            out["lr"] = lr
        return out

    def policy_fn(self):
        """obs [n, S] -> actions [n, A]: eval_candidates one-step samples per state from the actor, one
        drawn by softmax (or argmax) of the target critic's min Q (Diffusion-QL / CPQL evaluation)."""
        cfg, gen = self.cfg, self._eval_gen

        @torch.no_grad()
        def fn(obs):
            obs = obs.to(self.device, torch.float32)
            if cfg.eval_candidates == 1:
                return self.actor.sample(obs, 1, sigmas=cfg.sigmas, generator=gen, backend=cfg.backend)[:, 0]
            return self.actor.act(obs, self.critic_target, num_candidates=cfg.eval_candidates, select=cfg.eval_select,
                                  sigmas=cfg.sigmas, generator=gen, backend=cfg.backend)
        return fn


class CPQL(_CPQLCore, Trainer):
    """Offline CPQL on an OfflineDataset."""

    algo = "cpql"
    resume_fields = Trainer.resume_fields | {"steps", "grad_norm", "task", "lr_decay"}   # may change on resume
    lr_fields = {"lr": ("actor", "critic")}
    dist_batches = ("batch",)

    def __init__(self, dataset, cfg: Optional[CPQLConfig] = None, out_dir: str = "runs/cpql", device: str = "cpu",
                 progress_bar: bool = True, callback=None):
        cfg = cfg or CPQLConfig()
        if not isinstance(cfg, CPQLConfig):
            raise TypeError(f"cfg must be a CPQLConfig, got {type(cfg).__name__}")
        Trainer.__init__(self, cfg, out_dir, device, progress_bar, callback)
        self.dataset = dataset
        seed_everything(cfg.seed)
        self._build(dataset.obs_dim, dataset.act_dim, cfg, cfg.layer_norm)
        self.total_steps = cfg.steps
        self.updates = 0
        self.N = len(dataset)
        self._eval_gen = torch.Generator(device=self.device)

    def train_step(self):
        d = self.dataset
        idx = torch.randint(0, self.N, (self.cfg.batch,), generator=self.gen, device=self.device)
        batch = {"obs": d.obs[idx], "actions": d.actions[idx], "rewards": d.rewards[idx], "next_obs": d.next_obs[idx],
                 "dones": d.terminations[idx]}
        return self._update(batch, online=False), self.cfg.batch

    def _state(self):
        return {"updates": self.updates}

    def _load_state(self, st):
        self.updates = int(st.get("updates", self.step))

    def evaluate(self, num_episodes: Optional[int] = None, seeds=None):
        from ..evaluation import evaluate

        self._eval_gen.manual_seed(int(self.cfg.seed) + 7919 * (self.step + 1))
        return evaluate(self.policy_fn(), dataset=self.dataset, num_episodes=num_episodes or self.cfg.eval_episodes,
                        seeds=tuple(seeds) if seeds is not None else self.cfg.eval_seeds)


@dataclass
class CPQLOnlineConfig:
    """Online CPQL (MuJoCo defaults of the paper: alpha 0.05, eta 1, lr 3e-4, grad-norm 2, 1M steps,
    10k random warm-up, 1e6 buffer)."""
    env_id: str = "HalfCheetah-v5"
    hidden: int = 256
    depth: int = 3
    critic_hidden: int = 256
    critic_depth: int = 3
    layer_norm: bool = False
    lr: float = 3e-4
    lr_decay: bool = False            # cosine decay to 0 over ``steps`` (as CPQLConfig.lr_decay)
    eta: float = 1.0
    alpha: float = 0.05
    grad_norm: float = 2.0
    steps: int = 1_000_000            # environment steps
    warmup_steps: int = 10_000
    buffer_size: int = 1_000_000
    batch: int = 256
    gamma: float = 0.99
    ema_decay: float = 0.995
    update_ema_every: int = 5
    step_start_ema: int = 1000
    num_scales: int = 40
    q_norm: bool = False
    sigmas: Optional[tuple] = None
    eval_every: int = 10_000
    eval_episodes: int = 10
    eval_seeds: tuple = (0,)
    eval_candidates: int = 1          # online: the one-step sample (exploration and evaluation)
    eval_select: str = "softmax"
    log_every: int = 1000
    checkpoint_every: int = 50_000
    tensorboard: bool = True
    seed: int = 0
    backend: str = "auto"
    # torch.compile the trained networks' forward (Trainer.compile_networks; not the algorithm: speed only)
    compile: bool = False

    def __post_init__(self):
        for name in ("hidden", "depth", "critic_hidden", "critic_depth", "batch", "buffer_size", "update_ema_every",
                     "eval_candidates", "log_every"):
            C.positive_int(name, getattr(self, name))
        C.boolean("compile", self.compile)
        C.boolean("lr_decay", self.lr_decay)
        for name in ("steps", "warmup_steps", "step_start_ema", "eval_every", "eval_episodes", "checkpoint_every"):
            C.positive_int(name, getattr(self, name), minimum=0)
        C.positive_float("lr", self.lr)
        if not isinstance(self.env_id, str) or not self.env_id:
            raise ValueError(f"env_id must be a gymnasium environment id, got {self.env_id!r}")
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)


class CPQLOnline(_CPQLCore, Trainer):
    """Online CPQL: one gymnasium env, a replay buffer, random warm-up, one update per env step.

    A checkpoint stores the replay buffer only when ``store_buffer`` (it can be large); the env itself
    cannot be checkpointed: a resumed run starts a new episode (from a seed derived from the step).
    """

    algo = "cpql-online"
    resume_fields = Trainer.resume_fields | {"steps", "grad_norm", "lr_decay"}   # may change on resume
    lr_fields = {"lr": ("actor", "critic")}

    def __init__(self, cfg: Optional[CPQLOnlineConfig] = None, out_dir: str = "runs/cpql-online", device: str = "cpu",
                 progress_bar: bool = True, callback=None, store_buffer: bool = True):
        import gymnasium as gym
        from ..data import ReplayBuffer

        cfg = cfg or CPQLOnlineConfig()
        if not isinstance(cfg, CPQLOnlineConfig):
            raise TypeError(f"cfg must be a CPQLOnlineConfig, got {type(cfg).__name__}")
        Trainer.__init__(self, cfg, out_dir, device, progress_bar, callback)
        seed_everything(cfg.seed)
        try:
            self.env = gym.make(cfg.env_id)
        except Exception as e:
            raise ValueError(f"cannot make gymnasium env {cfg.env_id!r}: {e}") from None
        space = self.env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"env {cfg.env_id!r} needs a 1-d Box action space, got {space}")
        S = int(np.prod(self.env.observation_space.shape))
        A = int(space.shape[0])
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self._build(S, A, cfg, cfg.layer_norm)
        self.buffer = ReplayBuffer(S, A, min(cfg.buffer_size, max(cfg.steps, 1)), self.device)
        self.total_steps = cfg.steps
        self.updates = 0
        self.store_buffer = store_buffer
        self._np_rng = np.random.default_rng(cfg.seed)
        self._obs, _ = self.env.reset(seed=cfg.seed)
        self.episode_return, self.episode_returns = 0.0, []
        self._eval_gen = torch.Generator(device=self.device)

    def _to_env(self, a: np.ndarray) -> np.ndarray:
        return self.low + (np.clip(a, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)

    def train_step(self):
        cfg = self.cfg
        if self.step < cfg.warmup_steps:
            a = self._np_rng.uniform(-1.0, 1.0, size=self.act_dim)
        else:
            with torch.no_grad():
                o = torch.as_tensor(np.asarray(self._obs, dtype=np.float32).reshape(1, -1), device=self.device)
                a = self.actor.sample(o, 1, sigmas=cfg.sigmas, generator=self.gen, backend=cfg.backend)[0, 0].cpu().numpy()
        nobs, r, term, trunc, _ = self.env.step(self._to_env(a))
        self.buffer.add(np.asarray(self._obs, dtype=np.float32), a.astype(np.float32), float(r),
                        np.asarray(nobs, dtype=np.float32), float(term))
        self.episode_return += float(r)
        if term or trunc:
            self.episode_returns.append(self.episode_return)
            self.episode_return = 0.0
            nobs, _ = self.env.reset(seed=int(cfg.seed) * 1_000_003 + self.step)
        self._obs = nobs
        metrics: Dict[str, Any] = {"episode_return": self.episode_returns[-1] if self.episode_returns else float("nan")}
        if self.step >= cfg.warmup_steps and len(self.buffer) >= cfg.batch:
            batch = self.buffer.sample(cfg.batch, generator=self.gen)
            metrics.update(self._update(batch, online=True))
            return metrics, cfg.batch
        return metrics, 0

    def _state(self):
        st = {"updates": self.updates, "episode_returns": self.episode_returns, "np_rng": self._np_rng.bit_generator.state}
        if self.store_buffer and hasattr(self.buffer, "state_dict"):
            st["buffer"] = self.buffer.state_dict()
        return st

    def _load_state(self, st):
        self.updates = int(st.get("updates", 0))
        self.episode_returns = list(st.get("episode_returns", []))
        if "np_rng" in st:
            self._np_rng.bit_generator.state = st["np_rng"]
        if "buffer" in st and hasattr(self.buffer, "load_state_dict"):
            self.buffer.load_state_dict(st["buffer"])
        self._obs, _ = self.env.reset(seed=int(self.cfg.seed) * 1_000_003 + self.step)
        self.episode_return = 0.0

    def evaluate(self, num_episodes: Optional[int] = None, seeds=None):
        from ..evaluation import evaluate

        self._eval_gen.manual_seed(int(self.cfg.seed) + 7919 * (self.step + 1))
        return evaluate(self.policy_fn(), env_id=self.cfg.env_id, num_episodes=num_episodes or self.cfg.eval_episodes,
                        seeds=tuple(seeds) if seeds is not None else self.cfg.eval_seeds)

    def summary(self, final_eval):
        s = super().summary(final_eval)
        s["train_episode_returns"] = self.episode_returns
        return s
