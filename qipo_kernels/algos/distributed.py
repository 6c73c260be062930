"""QIPO and CPQL on several processes with torch.distributed (DistributedDataParallel).

Launch (one process per GPU, or several CPU processes; across machines with torchrun's rendezvous)::

    torchrun --nproc_per_node 4 -m qipo_kernels train qipo --dataset ID ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m qipo_kernels train cpql --dataset ID ...

The backend is NCCL on CUDA (device cuda:LOCAL_RANK) and gloo on the CPU.

How one training step is shared (the DistributedSampler rule: one shared draw, disjoint shares):

- Every rank holds the same training generator (same seed; a resumed run restores rank 0's saved state
  on every rank) and draws the *global* batch: the indices and every random number the losses use
  (flow times and noise, consistency noise levels, ...), exactly as one process would. Rank r keeps
  rows [r b, (r + 1) b) of them, b = batch / world size (an error names the batch otherwise).
- Each rank's loss is a mean over its rows; DistributedDataParallel averages the gradients, so the
  update is the one-process update on the global batch up to the order of floating-point sums.
  Batch statistics that are not means over rows are taken over the global batch: QIPO's
  ``normalize="batch"`` softmax over all pairs (the energies of the global batch are on every rank)
  and CPQL's |Q| normaliser (an all_reduce).
- QIPO's support renewal and Q-support refresh: the noise of state i comes from a generator seeded by
  (seed, stream, step, i // NOISE_BLOCK), so it does not depend on how the states are split. Rank r
  samples a contiguous range of whole blocks with the fused sampler, and ``all_gather`` assembles the
  full support set on every rank (the batches index any state, so each rank keeps all of it: memory
  per rank as on one process, sampling time divided by the world size).
- Rank 0 alone writes logs, checkpoints, config and summary, and evaluates; logged losses are the
  averages over the ranks, i.e. the global batch's.

Nothing in a checkpoint depends on the world size, so a run may resume with another number of
processes (a message says so; the global batch must still divide). CPQL online (one environment) runs
on one process only.
"""
from __future__ import annotations

import datetime
import inspect
import os
import warnings
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

NOISE_BLOCK = 256  # states per noise generator during support renewal (fixed: part of the random stream)

_MASK64 = (1 << 64) - 1


# ---- shard-invariant noise ------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(*parts: int) -> int:
    """A 63-bit seed mixing the integers ``parts`` (splitmix64 chain): distinct tuples, unrelated seeds."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def stream_id(name: str) -> int:
    """A stable integer for a noise stream's name (e.g. "renew-support")."""
    return zlib.crc32(name.encode())


def block_noise(key: Tuple[int, ...], lo: int, hi: int, tail: Tuple[int, ...], dtype: torch.dtype,
                device: torch.device, block: int = NOISE_BLOCK) -> torch.Tensor:
    """Standard normal noise for items [lo, hi): [hi - lo, *tail].

    Item i's noise is row ``i % block`` of ``randn([block, *tail])`` from a generator seeded by
    ``noise_seed(*key, i // block)``: it depends on (key, i) only, never on lo, hi or how a set of items
    is split into chunks or among processes.
    """
    if hi <= lo:
        return torch.empty((0,) + tuple(tail), dtype=dtype, device=device)
    g = torch.Generator(device=device)
    parts = []
    for b in range(lo // block, (hi - 1) // block + 1):
        g.manual_seed(noise_seed(*key, b))
        z = torch.randn((block,) + tuple(tail), dtype=dtype, device=device, generator=g)
        s, e = max(lo, b * block) - b * block, min(hi, (b + 1) * block) - b * block
        parts.append(z[s:e])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


# ---- the process group -----------------------------------------------------------------------------

# torch >= 2.13 renames broadcast_buffers (deprecated) to forward_sync_buffers
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


class _Call(nn.Module):
    """Lets DistributedDataParallel run any computation on a module as its forward (DDP prepares the
    gradient all-reduce only in forward; the policies train through ``loss`` / ``sample``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.module, *args, **kwargs)


class NullLogger:
    """The RunLogger of ranks other than 0: writes nothing."""

    def log(self, *a, **k) -> None:
        pass

    def truncate_after(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


class DistContext:
    """One process of a torch.distributed training run: rank, world size, device, DDP wrappers.

    Made by ``from_env()`` (under torchrun) or ``init()`` (explicit rank / world size / init method) and
    attached to a trainer with ``attach(trainer)``.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, owns_group: bool = False):
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.backend = tdist.get_backend()
        self.owns_group = owns_group
        self._ddp: Dict[int, Tuple[nn.Module, DistributedDataParallel]] = {}

    # -- batches
    def share(self, n: int, name: str = "batch") -> slice:
        """Rows of a global batch of ``n`` kept by this rank."""
        if n % self.world_size:
            raise ValueError(f"{name}={n} is not divisible by the world size {self.world_size}: each process takes "
                             f"an equal share of the global batch; use a multiple of {self.world_size}")
        b = n // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    def rows(self, x: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
        """This rank's share of a global-batch tensor along ``dim`` (None stays None)."""
        if x is None:
            return None
        s = self.share(x.shape[dim])
        return x[(slice(None),) * dim + (s,)]

    def call(self, module: nn.Module, fn: Callable):
        """``fn(module)`` through a DistributedDataParallel wrapper of ``module`` (made on first use):
        the backward of its result averages the gradients of ``module`` over the ranks."""
        ent = self._ddp.get(id(module))
        if ent is None or ent[0] is not module:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the buffers (e.g. Fourier features) never change: no broadcast before each forward
            ent = (module, DistributedDataParallel(_Call(module), device_ids=ids, **_NO_BUFFER_SYNC))
            self._ddp[id(module)] = ent
        return ent[1](fn)

    # -- collectives
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the ranks of a tensor of equal shape on each (no gradient)."""
        y = x.detach().clone()
        tdist.all_reduce(y)
        return y / self.world_size

    def end_step(self, metrics: Dict[str, Any], stop: bool) -> Tuple[Dict[str, Any], bool]:
        """The end of a training step on every rank, in one all_reduce: the scalar metrics averaged over the
        ranks (so rank 0 logs the global batch's) and whether any rank asks to ``stop`` (a Ctrl-C that
        reached it), so that all ranks stop after the same step."""
        keys = sorted(k for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, (int, float)))
        vals = [metrics[k].detach().reshape(()).to(self.device, torch.float64) if torch.is_tensor(metrics[k])
                else torch.tensor(float(metrics[k]), dtype=torch.float64, device=self.device) for k in keys]
        vals.append(torch.tensor(1.0 if stop else 0.0, dtype=torch.float64, device=self.device))
        v = torch.stack(vals)
        tdist.all_reduce(v)  # one host sync (tolist) for all the metrics and the stop flag
        got = v.tolist()
        out = dict(metrics)
        out.update({k: float(x) / self.world_size for k, x in zip(keys, got)})
        return out, got[-1] > 0

    def shard_range(self, n: int, block: int = NOISE_BLOCK) -> Tuple[int, int]:
        """This rank's contiguous range [lo, hi) of n items, split in whole blocks as evenly as possible."""
        return DistContext._range(self.rank, self.world_size, n, block)

    def gather_rows(self, local: torch.Tensor, n: int, block: int = NOISE_BLOCK) -> torch.Tensor:
        """The full [n, ...] tensor from each rank's ``shard_range(n)`` rows (all_gather, padded)."""
        ranges = [DistContext._range(r, self.world_size, n, block) for r in range(self.world_size)]
        width = max(hi - lo for lo, hi in ranges)
        pad = torch.zeros((width,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        pad[:local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        tdist.all_gather(parts, pad)
        return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, ranges)], 0)

    @staticmethod
    def _range(rank: int, world: int, n: int, block: int) -> Tuple[int, int]:
        nb = -(-n // block)
        return min(rank * nb // world * block, n), min((rank + 1) * nb // world * block, n)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context made it."""
        self._ddp.clear()
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()

    # -- trainers
    def attach(self, trainer) -> None:
        """Make ``trainer`` train as this rank: checks that every global batch divides among the ranks and
        that the trainer is on this rank's device; turns the progress bar off on ranks other than 0."""
        if getattr(trainer, "algo", None) == "cpql-online":
            raise ValueError("cpql-online trains from one environment and runs on one process only; "
                             "launch it without torchrun (or with --nproc_per_node 1)")
        fields = getattr(trainer, "dist_batches", ())
        if not fields:
            raise ValueError(f"{type(trainer).__name__} does not support distributed training")
        for name in fields:
            self.share(int(getattr(trainer.cfg, name)), name)
        if trainer.device != self.device:
            raise ValueError(f"the trainer is on {trainer.device} but rank {self.rank} runs on {self.device}")
        trainer.dist = self
        if self.rank != 0:
            trainer.progress_bar = False

    def resume_note(self, saved_world_size: int) -> Optional[str]:
        return resume_note(saved_world_size, self.world_size)


def resume_note(saved: int, now: int) -> Optional[str]:
    """The message for resuming a checkpoint written by ``saved`` processes with ``now`` (None if equal)."""
    if int(saved) == int(now):
        return None
    return (f"resuming a checkpoint written by {saved} process(es) with {now}: the global batch and the random "
            f"stream do not depend on the number of processes, so the run continues as it would have, up to "
            f"the order of floating-point sums")


DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "QIPO_DIST_TIMEOUT_S"


def check_timeout(timeout_s, name: str = "timeout_s") -> float:
    """A collective timeout in seconds: a finite number > 0 (a clear error naming ``name`` otherwise)."""
    try:
        v = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds > 0, got {timeout_s!r}") from None
    if isinstance(timeout_s, bool) or not (v > 0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {timeout_s!r}")
    return v


def init(rank: int, world_size: int, init_method: str = "env://", device: str = "cpu",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join (or make) the default process group: NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.

    ``timeout_s``: how long a collective waits for the other ranks before the job fails. Ranks other than
    0 wait in the next step's collective while rank 0 evaluates or writes a checkpoint, so it must exceed
    the longest evaluation (raise it for many or long evaluation episodes)."""
    timeout_s = check_timeout(timeout_s)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available here")
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cuda or cpu, got device {device!r}")
    owns = False
    if not tdist.is_initialized():
        kw = dict(device_id=dev) if dev.type == "cuda" else {}
        tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                 timeout=datetime.timedelta(seconds=timeout_s), **kw)
        owns = True
    elif tdist.get_world_size() != world_size or tdist.get_rank() != rank:
        raise ValueError(f"a process group (rank {tdist.get_rank()} of {tdist.get_world_size()}) already exists; "
                         f"asked for rank {rank} of {world_size}")
    return DistContext(rank, world_size, dev, owns_group=owns)


def from_env(device: str = "cpu", timeout_s: Optional[float] = None) -> Optional[DistContext]:
    """The DistContext of a process started by torchrun with more than one process (WORLD_SIZE > 1),
    else None (one process: nothing distributed). ``timeout_s`` (see ``init``): None reads
    $QIPO_DIST_TIMEOUT_S, default 1800."""
    if timeout_s is None:
        env = os.environ.get(TIMEOUT_ENV, "").strip()
        timeout_s = check_timeout(env, TIMEOUT_ENV) if env else DEFAULT_TIMEOUT_S
    else:
        timeout_s = check_timeout(timeout_s)
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ws <= 1:
        return None
    if "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun")
    return init(int(os.environ["RANK"]), ws, "env://", device, timeout_s=timeout_s)


# ---- the algorithms' sharded pieces (each the plain one-process computation when trainer.dist is None) ----

def flow_draws(policy, B: int, M: int, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (t [B, M], noise [B, M, A]) that ``FlowPolicy.loss`` draws from ``generator`` when not given,
    in the same order (tests/test_distributed.py checks that they stay the same)."""
    from ..reference.paths import VP_EPS

    hi = 1.0 - VP_EPS if policy.path == "vp" else 1.0
    t = torch.rand((B, M), dtype=dtype, device=device, generator=generator) * hi
    noise = torch.randn((B, M, policy.act_dim), dtype=dtype, device=device, generator=generator)
    return t, noise


def flow_loss(trainer, policy, obs: torch.Tensor, actions: torch.Tensor, energy: Optional[torch.Tensor] = None,
              **kw) -> torch.Tensor:
    """``policy.loss(obs, actions, energy, generator=trainer.gen, **kw)`` on the global batch (obs [B, S],
    actions [B, A] or [B, M, A], energy [B, M]); under torch.distributed, this rank's share of it through
    DDP, with the global batch's random draws (and its batch-softmax weights for normalize="batch")."""
    ctx = trainer.dist
    if ctx is None:
        return policy.loss(obs, actions, energy=energy, generator=trainer.gen, **kw)
    B = obs.shape[0]
    M = actions.shape[1] if actions.dim() == 3 else 1
    t, noise = flow_draws(policy, B, M, obs.dtype, obs.device, trainer.gen)
    zq = None  # FlowPolicy.loss' dequantization draw, after t and noise as there
    if kw.get("bound_dequant", 0.0) > 0.0:
        zq = torch.randn((B, M, policy.act_dim), dtype=obs.dtype, device=obs.device, generator=trainer.gen)
    pair_weight = None
    if energy is not None and kw.get("normalize", "support") == "batch":
        from ..reference.loss import energy_weights

        pair_weight = ctx.rows(energy_weights(energy.to(obs.dtype), float(kw.get("beta", 3.0)), "batch"))
        energy = None
    o, a, e, t, noise, zq = (ctx.rows(x) for x in (obs, actions, energy, t, noise, zq))
    return ctx.call(policy, lambda m: m.loss(o, a, energy=e, t=t, noise=noise, pair_weight=pair_weight,
                                             dequant_noise=zq, **kw))


def rank_mean(trainer, x: torch.Tensor) -> torch.Tensor:
    """x.mean() over the global batch when each rank holds an equal share of it (no gradient across ranks)."""
    m = x.mean()
    return m if trainer.dist is None else trainer.dist.mean(m)


def shard_range(trainer, n: int) -> Tuple[int, int]:
    """The states [lo, hi) this rank samples during a support renewal ((0, n) on one process)."""
    return (0, n) if trainer.dist is None else trainer.dist.shard_range(n)


def gather_rows(trainer, local: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Every rank's ``shard_range`` rows put together, [n, ...] on every rank (``local`` on one process)."""
    if local is None or trainer.dist is None:
        return local
    return trainer.dist.gather_rows(local, n)


def warn_resume(trainer, saved_world_size: int) -> None:
    """Rank 0 says so when a checkpoint was written by another number of processes."""
    now = trainer.dist.world_size if trainer.dist is not None else 1
    msg = resume_note(saved_world_size, now)
    if msg and trainer.is_main:
        warnings.warn(msg, stacklevel=2)
