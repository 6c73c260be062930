"""FLOP and byte counts per call, for the roofline columns of the benchmark report.

Conventions (stated so that a number can be checked by hand):
- A Linear(in, out) applied to one row costs 2 * in * out FLOPs (one multiply + one add per weight).
  Biases, activations, the time features (sin/cos) and the solver's axpy updates are not counted:
  they are O(width) per row against O(width^2) for the matmuls.
- A network evaluation is one ConditionalMLP forward on one row; a solver step costs
  ``STAGES[solver]`` evaluations; ``act`` adds one DoubleCritic forward (both heads) per candidate.
- Bytes are the *compulsory* traffic of one call: every input read once, every output written once,
  the weights read once. A fused kernel can approach it; the eager reference moves far more (every
  layer's activations go through memory), which is what the achieved-bandwidth column shows.
- The loss counts 3 FLOPs per element of pred (subtract, square, accumulate) plus 8 per pair for the
  softmax weights; backward doubles the elementwise part and writes the gradient of pred.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ddim": 1, "dpm1": 1, "dpm2": 2}


def linear_flops(in_features: int, out_features: int) -> int:
    """FLOPs of one Linear(in, out) on one row: 2 * in * out."""
    return 2 * int(in_features) * int(out_features)


def _cfg(net) -> Mapping[str, object]:
    if isinstance(net, Mapping):
        return net
    if hasattr(net, "config"):
        return net.config()
    raise TypeError(f"net must be a ConditionalMLP/DoubleCritic or its config() dict, got {type(net).__name__}")


def mlp_flops_per_row(net) -> int:
    """FLOPs of one ConditionalMLP evaluation on one row.

    time MLP (sinusoidal/fourier): Linear(T, 2T) + Linear(2T, T); none for "raw" (T = 1).
    trunk: Linear(A + T + S, H), (depth - 1) x Linear(H, H), Linear(H, A).
    """
    c = _cfg(net)
    A, S, H, depth = int(c["act_dim"]), int(c["obs_dim"]), int(c["hidden"]), int(c["depth"])
    T = int(c.get("t_dim", 16))
    emb = c.get("time_embedding", "sinusoidal")
    f = 0
    if emb != "raw":
        f += linear_flops(T, 2 * T) + linear_flops(2 * T, T)
    else:
        T = 1
    f += linear_flops(A + T + S, H) + (depth - 1) * linear_flops(H, H) + linear_flops(H, A)
    return f


def mlp_params(net) -> int:
    """Number of weights + biases of a ConditionalMLP (what a fused kernel reads once per call)."""
    c = _cfg(net)
    A, S, H, depth = int(c["act_dim"]), int(c["obs_dim"]), int(c["hidden"]), int(c["depth"])
    T = int(c.get("t_dim", 16))
    p = 0
    if c.get("time_embedding", "sinusoidal") != "raw":
        p += T * 2 * T + 2 * T + 2 * T * T + T
    else:
        T = 1
    p += (A + T + S) * H + H + (depth - 1) * (H * H + H) + H * A + A
    return p


def critic_flops_per_row(critic) -> int:
    """FLOPs of one DoubleCritic forward (both heads) on one (obs, action) row."""
    c = _cfg(critic)
    S, A, H, depth = int(c["obs_dim"]), int(c["act_dim"]), int(c["hidden"]), int(c["depth"])
    head = linear_flops(S + A, H) + (depth - 1) * linear_flops(H, H) + linear_flops(H, 1)
    return 2 * head


def critic_params(critic) -> int:
    c = _cfg(critic)
    S, A, H, depth = int(c["obs_dim"]), int(c["act_dim"]), int(c["hidden"]), int(c["depth"])
    head = (S + A) * H + H + (depth - 1) * (H * H + H) + H + 1
    return 2 * head


def evaluations(solver: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps of ``solver``."""
    if solver not in STAGES:
        raise ValueError(f"solver must be one of {tuple(STAGES)}, got {solver!r}")
    return int(steps) * STAGES[solver]


def integrate_cost(net, rows: int, steps: int, solver: str, obs_rows: Optional[int] = None, itemsize: int = 4):
    """(flops, bytes) of one integrate call on ``rows`` samples (B * K), obs of ``obs_rows`` states."""
    c = _cfg(net)
    A, S = int(c["act_dim"]), int(c["obs_dim"])
    obs_rows = rows if obs_rows is None else obs_rows
    flops = rows * evaluations(solver, steps) * mlp_flops_per_row(c)
    nbytes = itemsize * (mlp_params(c) + rows * A * 2 + obs_rows * S)
    return flops, nbytes


def consistency_cost(net, rows: int, n_steps: int, obs_rows: Optional[int] = None, itemsize: int = 4):
    """(flops, bytes) of a consistency_sample call with ``n_steps`` denoiser evaluations (1 + len(sigmas))."""
    c = _cfg(net)
    A, S = int(c["act_dim"]), int(c["obs_dim"])
    obs_rows = rows if obs_rows is None else obs_rows
    flops = rows * int(n_steps) * mlp_flops_per_row(c)
    # the re-noise draws of the extra steps are inputs too
    nbytes = itemsize * (mlp_params(c) + rows * A * (1 + int(n_steps)) + obs_rows * S)
    return flops, nbytes


def act_cost(net, critic, states: int, candidates: int, steps: int, solver: str, itemsize: int = 4):
    """(flops, bytes) of ops.act: sample K candidates per state, score all with the twin critic, pick one."""
    rows = states * candidates
    f, b = integrate_cost(net, rows, steps, solver, obs_rows=states, itemsize=itemsize)
    c = _cfg(critic)
    f += rows * critic_flops_per_row(c)
    b += itemsize * critic_params(c) - itemsize * rows * int(_cfg(net)["act_dim"])  # only [B, A] is written
    b += itemsize * states * int(_cfg(net)["act_dim"])
    return f, b


def loss_cost(B: int, M: int, D: int, energy: bool = True, backward: bool = False, itemsize: int = 4,
              inputs_per_element: int = 2):
    """(flops, bytes) of weighted_fm_loss (inputs_per_element=2: pred, target) or flow_matching_loss
    (3: pred, actions, noise; plus t [B, M]) forward, or forward + backward."""
    n = B * M * D
    flops = 3 * n + (8 * B * M if energy else 0)
    nbytes = itemsize * (inputs_per_element * n + (B * M if energy else 0) + (B * M if inputs_per_element == 3 else 0))
    if backward:
        flops += 3 * n
        nbytes += itemsize * n  # grad of pred written
    return flops, nbytes


def select_cost(B: int, K: int, D: int, itemsize: int = 4):
    """(flops, bytes) of select_action (argmax): K compares per state; reads q [B, K], writes [B, D]."""
    return B * K, itemsize * (B * K + B * D) + itemsize * B * D


Number = Union[int, float]


def roofline(flops: Number, nbytes: Number, seconds: float, peak_flops: Optional[float], peak_bw: Optional[float]):
    """Achieved FLOP/s and bytes/s of one call and their fractions of the measured peaks.

    Returns a dict with gflops, gbps, intensity (FLOP/byte), frac_flops, frac_bw (None where the
    peak is unknown). ``seconds`` is the median time per call.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    fs = flops / seconds
    bs = nbytes / seconds
    return {
        "gflops": fs / 1e9,
        "gbps": bs / 1e9,
        "intensity": (flops / nbytes) if nbytes else None,
        "frac_flops": (fs / peak_flops) if peak_flops else None,
        "frac_bw": (bs / peak_bw) if peak_bw else None,
    }
