"""Fused candidate selection (Triton): pick one of K candidates per state by its Q value.

Op registered here (backend "triton"):

* ``select_action(q_values, candidates, mode, temperature, uniform, generator)``:
  q_values [B, K], candidates [B, K, D], uniform [B] or None -> [B, D]

Same result as qipo_kernels.ops._select_ref / reference.select.select_index:
"argmax" takes the first index of the largest Q (torch.argmax); "softmax" draws by inverse CDF
from softmax(Q / temperature), computed in float64 like the reference as (Q - max Q) / temperature
(the difference first): the index is the number of k with cdf[k] <= u, capped at K - 1. When
``uniform`` is None, u [B] is drawn on the host with
torch.rand(B, dtype=float64, generator=generator), exactly the reference's draw, so the same
generator state gives the same choice. One launch: each program handles a block of states, loops
over K in chunks (any K), and gathers the chosen candidate's D values (any D, in chunks).

The launch is a torch.library custom op with a fake implementation (torch.compile traces it; no
host synchronisation). No gradient: the choice is discrete (the reference indexes candidates, so
it would pass a gradient to the chosen rows; supports() declines candidates that require grad).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import backends as _backends
from . import _host

TILE = 2048  # q values per program tile (states x candidates); tests lower it to force chunking
MAX_BLOCK_K = 256
MAX_BLOCK_D = 128


# temperature is a float64 scalar (a Python float would be passed as float32: 1e-300 would be 0)
@triton.jit(do_not_specialize=["B"])
def _select_kernel(q_ptr, c_ptr, u_ptr, out_ptr, B, K, D, temperature: tl.float64,
                   SOFTMAX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b_off = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b_off < B
    k_lane = tl.arange(0, BLOCK_K)
    if SOFTMAX:
        # pass 1: per state max q and sum of exp((q - max) / temperature), in float64; the difference
        # first (as the reference), so a tiny temperature or a huge q cannot overflow
        run_max = tl.full([BLOCK_B], float("-inf"), tl.float64)
        run_sum = tl.zeros([BLOCK_B], tl.float64)
        for k0 in range(0, K, BLOCK_K):
            k_off = k0 + k_lane
            mask = b_mask[:, None] & (k_off < K)[None, :]
            q = tl.load(q_ptr + b_off[:, None] * K + k_off[None, :], mask=mask, other=0.0).to(tl.float64)
            q = tl.where(mask, q, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(q, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = (run_sum * tl.exp((run_max - safe) / temperature)
                       + tl.sum(tl.exp((q - safe[:, None]) / temperature), axis=1))
            run_max = new_max
        safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
        inv_sum = 1.0 / tl.where(run_sum > 0.0, run_sum, 1.0)
        u = tl.load(u_ptr + b_off, mask=b_mask, other=0.0).to(tl.float64)
        # pass 2: count k with cdf[k] <= u, the cdf carried across chunks
        carry = tl.zeros([BLOCK_B], tl.float64)
        count = tl.zeros([BLOCK_B], tl.int64)
        for k0 in range(0, K, BLOCK_K):
            k_off = k0 + k_lane
            mask = b_mask[:, None] & (k_off < K)[None, :]
            q = tl.load(q_ptr + b_off[:, None] * K + k_off[None, :], mask=mask, other=0.0).to(tl.float64)
            p = tl.where(mask, tl.exp((q - safe_max[:, None]) / temperature) * inv_sum[:, None], 0.0)
            cdf = carry[:, None] + tl.cumsum(p, axis=1)
            count += tl.sum((mask & (cdf <= u[:, None])).to(tl.int64), axis=1)
            carry += tl.sum(p, axis=1)
        idx = tl.minimum(count, K - 1)
    else:
        # compared in float64: exact for every input dtype, so ties are ties exactly when torch sees them
        best = tl.full([BLOCK_B], float("-inf"), tl.float64)
        idx = tl.zeros([BLOCK_B], tl.int64)
        for k0 in range(0, K, BLOCK_K):
            k_off = k0 + k_lane
            mask = b_mask[:, None] & (k_off < K)[None, :]
            q = tl.load(q_ptr + b_off[:, None] * K + k_off[None, :], mask=mask, other=float("-inf")).to(tl.float64)
            q = tl.where(mask, q, float("-inf"))
            c_max = tl.max(q, axis=1)
            c_idx = tl.argmax(q, axis=1, tie_break_left=True).to(tl.int64) + k0
            better = c_max > best  # strict: an equal value later keeps the first index
            idx = tl.where(better, c_idx, idx)
            best = tl.where(better, c_max, best)
    # gather the chosen candidate's D values
    row = (b_off * K + idx) * D
    for d0 in range(0, D, BLOCK_D):
        d_off = d0 + tl.arange(0, BLOCK_D)
        mask = b_mask[:, None] & (d_off < D)[None, :]
        v = tl.load(c_ptr + row[:, None] + d_off[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + b_off[:, None] * D + d_off[None, :], v, mask=mask)


def _select_launch(q_values, candidates, softmax: bool, temperature: float, uniform: Optional[torch.Tensor]):
    B, K = q_values.shape
    D = candidates.shape[2]
    q = q_values.contiguous()
    c = candidates.contiguous()
    out = _host.empty((B, D), candidates.dtype, candidates.device)
    if D == 0:
        return out
    block_k = min(_host.next_pow2(K), MAX_BLOCK_K)
    block_b = min(_host.next_pow2(B), max(1, TILE // block_k))
    block_d = min(_host.next_pow2(D), MAX_BLOCK_D)
    u = uniform.to(torch.float64).contiguous() if uniform is not None else q  # the reference uses u.double()
    with _host.device_guard(q.device):
        _select_kernel[(triton.cdiv(B, block_b),)](q, c, u, out, B, K, D, float(temperature),
                                                   SOFTMAX=softmax, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d)
    return out


@torch.library.custom_op("qipo_kernels::triton_select_action", mutates_args=())
def _select_op(q_values: torch.Tensor, candidates: torch.Tensor, softmax: bool, temperature: float,
               uniform: Optional[torch.Tensor]) -> torch.Tensor:
    return _select_launch(q_values, candidates, softmax, temperature, uniform)


@_select_op.register_fake
def _(q_values, candidates, softmax, temperature, uniform):
    return candidates.new_empty((candidates.shape[0], candidates.shape[2]))


def select_action(q_values, candidates, mode, temperature, uniform, generator):
    """Fused ops._select_ref: q_values [B, K], candidates [B, K, D], uniform [B] | None -> [B, D]."""
    softmax = mode == "softmax"
    if softmax and uniform is None:
        uniform = torch.rand(q_values.shape[0], dtype=torch.float64, device=q_values.device, generator=generator)
    return _select_op(q_values, candidates, softmax, float(temperature), uniform if softmax else None)


def _supports_select_action(q_values=None, candidates=None, mode=None, **_) -> List[str]:
    all_float = _host._GPU_DTYPES + (torch.float64,)
    out = _host.dtype_reasons("q_values", q_values, all_float)
    out += _host.dtype_reasons("candidates", candidates, all_float)
    if _host.grad_wanted(candidates):
        out.append("candidates require grad: the Triton selection has no backward (the reference indexes, "
                   "so it passes a gradient to the chosen rows)")
    return out


_backends.register("select_action", "triton", select_action, _supports_select_action)
