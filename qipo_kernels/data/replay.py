"""A fixed-capacity ring replay buffer on the training device (online CPQL)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .._checks import FLOAT_DTYPES, positive_int
from .dataset import _check_device

_ACTION_TOL = 1e-5


class ReplayBuffer:
    """Ring buffer of (obs, action, reward, next_obs, terminated); the oldest entries are overwritten.

    Storage: obs / next_obs [capacity, obs_dim], actions [capacity, act_dim] (in [-1, 1]),
    rewards / terminations [capacity], all on ``device``.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device="cpu", dtype: torch.dtype = torch.float32):
        positive_int("obs_dim", obs_dim)
        positive_int("act_dim", act_dim)
        positive_int("capacity", capacity)
        self.device = _check_device(device)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
        self.obs_dim, self.act_dim, self.capacity, self.dtype = obs_dim, act_dim, capacity, dtype
        kw = dict(device=self.device, dtype=dtype)
        self.obs = torch.zeros(capacity, obs_dim, **kw)
        self.actions = torch.zeros(capacity, act_dim, **kw)
        self.rewards = torch.zeros(capacity, **kw)
        self.next_obs = torch.zeros(capacity, obs_dim, **kw)
        self.terminations = torch.zeros(capacity, **kw)
        self._ptr = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _rows(self, name: str, x, width: Optional[int]) -> torch.Tensor:
        """x as a 2-d [n, width] (or 1-d [n] when width is None) float tensor, still on its own device."""
        t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
        if t.dtype == torch.bool:
            t = t.to(torch.float32)
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{name} must be numeric, got dtype {t.dtype}")
        t = t.to(torch.float64 if self.dtype == torch.float64 else torch.float32)
        if width is None:
            if t.dim() > 1:
                raise ValueError(f"{name} must be a scalar or [n], got shape {tuple(t.shape)}")
            return t.reshape(-1)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"{name} must be [{width}] or [n, {width}], got shape {tuple(t.shape)}")
        return t

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        """Add one transition (obs [S], action [A], scalars) or a batch (obs [n, S], action [n, A], [n]).

        Numpy arrays or tensors (any device); ``action`` must be in [-1, 1]; ``terminated`` is
        0/1 (or bool) and must be False for time-limit truncations. Values are checked where they
        are given (numpy input: on the CPU, no device sync) and then copied to the buffer's device.
        """
        o = self._rows("obs", obs, self.obs_dim)
        a = self._rows("action", action, self.act_dim)
        r = self._rows("reward", reward, None)
        no = self._rows("next_obs", next_obs, self.obs_dim)
        d = self._rows("terminated", terminated, None)
        n = o.shape[0]
        for name, t in (("action", a), ("reward", r), ("next_obs", no), ("terminated", d)):
            if t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows but obs has {n}")
        for name, t in (("obs", o), ("action", a), ("reward", r), ("next_obs", no)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf values")
        if bool((a.abs() > 1 + _ACTION_TOL).any()):
            raise ValueError("action must be in [-1, 1] (scale env actions with OfflineDataset/DatasetInfo "
                             "scale_action first)")
        if not bool(((d == 0) | (d == 1)).all()):
            raise ValueError("terminated must be 0/1 or bool")
        if n > self.capacity:  # only the newest `capacity` rows survive
            o, a, r, no, d = (x[-self.capacity:] for x in (o, a, r, no, d))
            n = self.capacity
        idx = (self._ptr + torch.arange(n, device=self.device)) % self.capacity
        for buf, x in ((self.obs, o), (self.actions, a.clamp(-1, 1)), (self.rewards, r), (self.next_obs, no),
                       (self.terminations, d)):
            buf[idx] = x.to(self.device, self.dtype, non_blocking=True)
        self._ptr = (self._ptr + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Uniform minibatch with replacement: dict(obs [B, S], actions [B, A], rewards [B],
        next_obs [B, S], dones [B]) on the buffer's device."""
        positive_int("batch_size", batch_size)
        if self._size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer; add transitions first")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gdev = generator.device if generator is not None else self.device
        idx = torch.randint(self._size, (batch_size,), generator=generator, device=gdev).to(self.device)
        return {"obs": self.obs[idx], "actions": self.actions[idx], "rewards": self.rewards[idx],
                "next_obs": self.next_obs[idx], "dones": self.terminations[idx]}

    def state_dict(self) -> Dict:
        """Contents and position (for resumable checkpoints); tensors on the CPU."""
        return {"obs": self.obs.cpu(), "actions": self.actions.cpu(), "rewards": self.rewards.cpu(),
                "next_obs": self.next_obs.cpu(), "terminations": self.terminations.cpu(),
                "ptr": self._ptr, "size": self._size, "capacity": self.capacity}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("capacity") != self.capacity or tuple(state["obs"].shape) != tuple(self.obs.shape) or \
                tuple(state["actions"].shape) != tuple(self.actions.shape):
            raise ValueError(f"state is for a buffer of capacity {state.get('capacity')} and shapes "
                             f"{tuple(state['obs'].shape)}/{tuple(state['actions'].shape)}; this one is "
                             f"{self.capacity}, {tuple(self.obs.shape)}/{tuple(self.actions.shape)}")
        for k in ("obs", "actions", "rewards", "next_obs", "terminations"):
            getattr(self, k).copy_(state[k].to(self.device, self.dtype))
        self._ptr, self._size = int(state["ptr"]), int(state["size"])

    def __repr__(self) -> str:
        return f"ReplayBuffer(size={self._size}/{self.capacity}, obs_dim={self.obs_dim}, act_dim={self.act_dim})"
