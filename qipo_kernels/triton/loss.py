"""Fused energy-weighted flow-matching loss and path builder (Triton).

Ops registered here (backend "triton"):

* ``flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight)``
* ``weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight)``
* ``flow_path(actions, noise, t, path)``

Same arguments and results as qipo_kernels.reference.loss / .paths. Shapes: pred, actions, noise,
target [B, M, D]; energy, pair_weight [B, M]; t [B, M] (flow_path: any [..., D] with t [...]).

The loss kernel reads pred and the target's ingredients once, forms the target in registers
("ot": a - z; "ot-eps" / "vp": z; the target never exists in memory), computes the support softmax
of beta * (energy - max energy) (beta * Q in the thousands is fine), the weighted
squared error and d loss / d pred in the same pass. The backward pass only scales the saved
gradient by grad_output. normalize="batch" first runs a tiny launch that reduces the global
(max, sum exp) of beta * energy over all B * M pairs into at most 128 partials; the loss kernel
combines those partials itself (no host round trip, nothing to synchronise). The logits are
beta * (energy - max energy), the difference first, in every backend.

Gradients: the same as the reference's autograd: pred; target (weighted_fm_loss); actions
("ot") and noise (flow_matching_loss) through the target; pair_weight. Energy gets none (the
reference detaches the weights) and neither does t (the target does not depend on t). Double
backward (create_graph=True) raises: the saved gradient is a constant of pred. flow_path has no
backward: its supports() declines inputs that need a gradient, so backend="auto" falls back to
the reference there.

Each forward is a torch.library custom op with a fake (meta) implementation, and the loss has
an autograd formula registered on it, so torch.compile traces through without graph breaks and
the launch path has no host synchronisation (CUDA-graph capturable).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends as _backends
from ..reference import paths as _paths
from . import _host

# Elements per program tile (states x support actions x action dim). Tests lower it to force the
# chunked support loop and many programs on small inputs.
TILE = 2048
# Batch normalisation: energies per program of the statistics launch, and at most this many partials.
STATS_BLOCK = 1024
MAX_PARTIALS = 128

_NORM = {"uniform": 0, "support": 1, "batch": 2}
# target modes: 0 the target is given (x1); 1 "ot": x1 - x2 (actions - noise); 2 noise x2 ("ot-eps", "vp")
_TARGET_MODE = {"ot": 1, "ot-eps": 2, "vp": 2}


@triton.jit(do_not_specialize=["N", "n_iter", "n_prog"])
def _batch_stats_kernel(e_ptr, stats_ptr, N, beta, n_iter, n_prog, BLOCK: tl.constexpr):
    """Per program: running (max e, sum exp(beta (e - max e))) of the energies e over its chunks.

    Writes stats[pid] = max, stats[n_prog + pid] = sum. (The difference before beta: see _fm_loss_kernel.)
    """
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for it in range(0, n_iter):
        offs = (it * n_prog + pid).to(tl.int64) * BLOCK + lanes
        mask = offs < N
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.where(mask, e, float("-inf"))
        new_max = tl.maximum(run_max, e)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(beta * (run_max - safe)) + tl.exp(beta * (e - safe))
        run_max = new_max
    m = tl.max(run_max, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(run_sum * tl.exp(beta * (run_max - m_safe)), axis=0)
    tl.store(stats_ptr + pid, m)
    tl.store(stats_ptr + n_prog + pid, s)


# batch-like sizes are not specialised on (no recompilation for every new batch size)
@triton.jit(do_not_specialize=["S", "n_stats"])
def _fm_loss_kernel(
    pred_ptr, x1_ptr, x2_ptr, e_ptr, pw_ptr, stats_ptr,
    grad_ptr, dpw_ptr, part_ptr,
    S, M, D, n_stats, beta, scale,
    TARGET: tl.constexpr, NORM: tl.constexpr, HAS_PW: tl.constexpr,
    NEED_GRAD: tl.constexpr, NEED_PW_GRAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: BLOCK_S states (rows of [S, M, D]), all their M support actions in chunks.

    NORM 0: weight 1; 1: softmax over the M actions of a state; 2: exp(beta (e - gmax)) / gsum with
    the global statistics combined from the n_stats partials. loss partial = scale * sum w * lambda * sq,
    grad = 2 * scale * w * lambda * (pred - target), dpw = scale * w * sq.
    The logits are beta * (e - max e), the difference formed before the product (as every backend):
    energies 5e3 + N(0, 1) keep their float32 precision, and beta * e never overflows.
    """
    pid = tl.program_id(0)
    s_off = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s_off < S
    d_off = tl.arange(0, BLOCK_D)
    d_mask = d_off < D
    m_lane = tl.arange(0, BLOCK_M)

    if NORM == 1:
        # pass 1 over the energies only: per-state max e and sum of exp(beta (e - max))
        run_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_S], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m_off = m0 + m_lane
            mask2 = s_mask[:, None] & (m_off < M)[None, :]
            e = tl.load(e_ptr + s_off[:, None] * M + m_off[None, :], mask=mask2, other=0.0).to(tl.float32)
            e = tl.where(mask2, e, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(e, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(beta * (run_max - safe)) + tl.sum(tl.exp(beta * (e - safe[:, None])), axis=1)
            run_max = new_max
        w_max = tl.where(run_max == float("-inf"), 0.0, run_max)
        w_inv = 1.0 / tl.where(run_sum > 0.0, run_sum, 1.0)
    if NORM == 2:
        p_off = tl.arange(0, BLOCK_P)
        p_mask = p_off < n_stats
        pm = tl.load(stats_ptr + p_off, mask=p_mask, other=float("-inf"))
        ps = tl.load(stats_ptr + n_stats + p_off, mask=p_mask, other=0.0)
        g_max = tl.max(pm, axis=0)
        g_max = tl.where(g_max == float("-inf"), 0.0, g_max)
        g_sum = tl.sum(tl.where(p_mask & (pm > float("-inf")), ps * tl.exp(beta * (pm - g_max)), 0.0), axis=0)
        g_inv = 1.0 / tl.where(g_sum > 0.0, g_sum, 1.0)

    acc = tl.zeros([BLOCK_S], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_off = m0 + m_lane
        mask2 = s_mask[:, None] & (m_off < M)[None, :]
        pair = s_off[:, None] * M + m_off[None, :]  # [BLOCK_S, BLOCK_M] pair index
        if NORM == 1:
            e = tl.load(e_ptr + pair, mask=mask2, other=0.0).to(tl.float32)
            w = tl.exp(beta * (e - w_max[:, None])) * w_inv[:, None]
        elif NORM == 2:
            e = tl.load(e_ptr + pair, mask=mask2, other=0.0).to(tl.float32)
            w = tl.exp(beta * (e - g_max)) * g_inv
        else:
            w = tl.full([BLOCK_S, BLOCK_M], 1.0, tl.float32)
        w = tl.where(mask2, w, 0.0)

        mask3 = mask2[:, :, None] & d_mask[None, None, :]
        offs3 = pair[:, :, None] * D + d_off[None, None, :]
        p = tl.load(pred_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
        if TARGET == 0:
            tgt = tl.load(x1_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
        elif TARGET == 1:
            a = tl.load(x1_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
            zn = tl.load(x2_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
            tgt = a - zn
        else:
            tgt = tl.load(x2_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
        diff = tl.where(mask3, p - tgt, 0.0)
        sq = tl.sum(diff * diff, axis=2)  # [BLOCK_S, BLOCK_M]
        if HAS_PW:
            lam = tl.load(pw_ptr + pair, mask=mask2, other=0.0).to(tl.float32)
            wl = w * lam
        else:
            wl = w
        acc += tl.sum(tl.where(mask2, wl * sq, 0.0), axis=1)
        if NEED_GRAD:
            g = (2.0 * scale) * wl[:, :, None] * diff
            tl.store(grad_ptr + offs3, g.to(grad_ptr.dtype.element_ty), mask=mask3)
        if NEED_PW_GRAD:
            tl.store(dpw_ptr + pair, (scale * w * sq).to(dpw_ptr.dtype.element_ty), mask=mask2)
    tl.store(part_ptr + pid, scale * tl.sum(acc, axis=0))


def _tiles(S: int, M: int, D: int) -> Tuple[int, int, int]:
    block_d = _host.next_pow2(D)
    block_m = min(_host.next_pow2(M), max(1, TILE // block_d))
    block_s = min(_host.next_pow2(S), max(1, TILE // (block_m * block_d)))
    return block_s, block_m, block_d


def _contig(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.contiguous()


def _fm_loss_launch(pred, x1, x2, energy, pair_weight, beta: float, target_mode: int, norm: int,
                    need_grad: bool, need_pw_grad: bool):
    """Run the fused loss. Returns (loss [] in pred's dtype, grad_pred [B, M, D] or [0], dpw [B, M] or [0])."""
    B, M, D = pred.shape
    dev = pred.device
    pred, x1, x2, energy, pair_weight = (_contig(v) for v in (pred, x1, x2, energy, pair_weight))
    if norm == 1:
        S, Mk, scale = B, M, 1.0 / B
    else:  # uniform and batch weights ignore the state structure: B * M independent pairs
        S, Mk, scale = B * M, 1, (1.0 if norm == 2 else 1.0 / (B * M))
    block_s, block_m, block_d = _tiles(S, Mk, D)
    n_prog = triton.cdiv(S, block_s)
    grad = _host.empty((B, M, D) if need_grad else (0,), pred.dtype, dev)
    dpw = _host.empty((B, M) if need_pw_grad else (0,), pair_weight.dtype if need_pw_grad else pred.dtype, dev)
    part = _host.empty((n_prog,), torch.float32, dev)
    dummy = pred  # never read: the constexpr flags switch its loads off
    with _host.device_guard(dev):
        n_stats, block_p = 1, 1
        stats = part  # placeholder pointer when there is no batch statistic
        if norm == 2:
            n = B * M
            n_chunks = triton.cdiv(n, STATS_BLOCK)
            n_stats = min(n_chunks, MAX_PARTIALS)
            block_p = _host.next_pow2(n_stats)
            stats = _host.empty((2 * n_stats,), torch.float32, dev)
            _batch_stats_kernel[(n_stats,)](energy, stats, n, float(beta), triton.cdiv(n_chunks, n_stats), n_stats,
                                            BLOCK=STATS_BLOCK)
        _fm_loss_kernel[(n_prog,)](
            pred, x1 if x1 is not None else dummy, x2 if x2 is not None else dummy,
            energy if energy is not None else dummy, pair_weight if pair_weight is not None else dummy, stats,
            grad if need_grad else part, dpw if need_pw_grad else part, part,
            S, Mk, D, n_stats, float(beta), float(scale),
            TARGET=target_mode, NORM=norm, HAS_PW=pair_weight is not None,
            NEED_GRAD=need_grad, NEED_PW_GRAD=need_pw_grad,
            BLOCK_S=block_s, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_P=block_p,
        )
    loss = part.sum().to(pred.dtype)
    return loss, grad, dpw


# ---- torch.library custom op (torch.compile / CUDA graphs) with its autograd formula ----

@torch.library.custom_op("qipo_kernels::triton_fm_loss", mutates_args=())
def _fm_loss_op(pred: torch.Tensor, x1: Optional[torch.Tensor], x2: Optional[torch.Tensor],
                energy: Optional[torch.Tensor], pair_weight: Optional[torch.Tensor], beta: float,
                target_mode: int, norm: int, need_grad: bool,
                need_pw_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fm_loss_launch(pred, x1, x2, energy, pair_weight, beta, target_mode, norm, need_grad, need_pw_grad)


@_fm_loss_op.register_fake
def _(pred, x1, x2, energy, pair_weight, beta, target_mode, norm, need_grad, need_pw_grad):
    B, M, D = pred.shape
    grad = pred.new_empty((B, M, D) if need_grad else (0,))
    dpw = (pair_weight.new_empty((B, M)) if need_pw_grad else pred.new_empty((0,)))
    return pred.new_empty(()), grad, dpw


def _fm_setup_context(ctx, inputs, output):
    target_mode = inputs[6]
    _, grad, dpw = output
    ctx.target_mode = target_mode
    ctx.save_for_backward(grad, dpw)
    ctx.mark_non_differentiable(grad, dpw)


def _fm_backward(ctx, g_loss, _g_grad, _g_dpw):
    if torch.is_grad_enabled():
        # backward(create_graph=True): the saved gradient is a constant here, so a second derivative
        # (a gradient penalty, a Hessian-vector product) would silently be zero. Refuse instead.
        raise RuntimeError("the Triton flow-matching loss does not support double backward; use backend='torch'")
    grad, dpw = ctx.saved_tensors
    need = ctx.needs_input_grad
    g_pred = g_x1 = g_x2 = g_pw = None
    if need[0] or need[1] or need[2]:
        scaled = grad * g_loss.to(grad.dtype)
        if need[0]:
            g_pred = scaled
        if need[1]:  # x1 is the target (mode 0) or the actions (mode 1): both enter with a minus sign
            g_x1 = -scaled
        if need[2]:  # x2 is the noise: target = a - z (mode 1) or z (mode 2)
            g_x2 = scaled if ctx.target_mode == 1 else -scaled
    if need[4]:
        g_pw = dpw * g_loss.to(dpw.dtype)
    return g_pred, g_x1, g_x2, None, g_pw, None, None, None, None, None


torch.library.register_autograd("qipo_kernels::triton_fm_loss", _fm_backward, setup_context=_fm_setup_context)


def _fm_loss(pred, x1, x2, energy, pair_weight, beta, target_mode, normalize):
    norm = _NORM[normalize] if energy is not None else 0
    need_grad = _host.grad_wanted(pred, x1, x2)
    need_pw_grad = _host.grad_wanted(pair_weight)
    loss, _, _ = _fm_loss_op(pred, x1, x2, energy if norm else None, pair_weight, float(beta), target_mode, norm,
                             need_grad, need_pw_grad)
    return loss


def flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight):
    """Fused reference.loss.flow_matching_loss: pred/actions/noise [B, M, D], t/energy [B, M] -> scalar.

    The target is formed in the kernel ("ot": actions - noise, "ot-eps"/"vp": noise); t is not
    read (the target of these paths does not depend on it; x_t is built by flow_path).
    """
    mode = _TARGET_MODE[path]
    x1 = actions if mode == 1 else None
    return _fm_loss(pred, x1, noise, energy, pair_weight, beta, mode, normalize)


def weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight):
    """Fused reference.loss.weighted_fm_loss: pred/target [B, M, D], energy/pair_weight [B, M] -> scalar."""
    return _fm_loss(pred, target, None, energy, pair_weight, beta, 0, normalize)


def _loss_reasons(pred, others, energy, pair_weight) -> List[str]:
    out: List[str] = []
    out += _host.dtype_reasons("pred", pred)
    for name, x in others:
        if x is not None and pred is not None and x.dtype != pred.dtype:
            out.append(f"{name} has dtype {x.dtype} but pred has {pred.dtype}")
    all_float = _host._GPU_DTYPES + (torch.float64,)
    out += _host.dtype_reasons("energy", energy, all_float)
    out += _host.dtype_reasons("pair_weight", pair_weight)
    if pair_weight is not None and pred is not None and pair_weight.dtype != pred.dtype:
        out.append(f"pair_weight has dtype {pair_weight.dtype} but pred has {pred.dtype} (the reference would "
                   "promote the loss's dtype)")
    if pred is not None and pred.dim() == 3 and pred.shape[-1] > _host.MAX_D:
        out.append(f"action dim D = {pred.shape[-1]} > {_host.MAX_D}, the widest row one Triton tile holds")
    return out


def _supports_flow_matching_loss(pred=None, actions=None, noise=None, t=None, path=None, energy=None,
                                 normalize=None, pair_weight=None, **_) -> List[str]:
    return _loss_reasons(pred, [("actions", actions), ("noise", noise)], energy, pair_weight)


def _supports_weighted_fm_loss(pred=None, target=None, energy=None, normalize=None, pair_weight=None, **_) -> List[str]:
    return _loss_reasons(pred, [("target", target)], energy, pair_weight)


# ---- flow_path: x_t (and the "ot" target) in one launch ----

@triton.jit(do_not_specialize=["N"])
def _flow_path_kernel(a_ptr, z_ptr, t_ptr, x_ptr, tgt_ptr, N, D, beta0, beta1,
                      PATH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """PATH 0 "ot": x = t a + (1 - t) z, target = a - z; 1 "ot-eps": x as "ot"; 2 "vp": x = alpha a + sigma z."""
    pid = tl.program_id(0)
    n_off = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_off < N
    d_off = tl.arange(0, BLOCK_D)
    mask = n_mask[:, None] & (d_off < D)[None, :]
    offs = n_off[:, None] * D + d_off[None, :]
    # t is rounded to the actions' dtype first, as the reference does, then computed in float32
    t = tl.load(t_ptr + n_off, mask=n_mask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    if PATH == 2:
        s = 1.0 - t
        log_alpha = -0.25 * s * s * (beta1 - beta0) - 0.5 * s * beta0
        alpha = tl.exp(log_alpha)
        # sigma = sqrt(-expm1(2 log_alpha)); expm1 by Kahan's trick (exact near 0, where 1 - exp cancels)
        x2 = 2.0 * log_alpha
        u = tl.exp(x2)
        um1 = u - 1.0
        em1 = tl.where(u == 1.0, x2, tl.where(um1 == -1.0, -1.0, um1 * x2 / tl.log(tl.where(u == 1.0, 2.0, u))))
        sigma = tl.sqrt(tl.maximum(-em1, 0.0))
    else:
        alpha = t
        sigma = 1.0 - t
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = alpha[:, None] * a + sigma[:, None] * z
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)
    if PATH == 0:
        tl.store(tgt_ptr + offs, (a - z).to(tgt_ptr.dtype.element_ty), mask=mask)


_PATH_CODE = {"ot": 0, "ot-eps": 1, "vp": 2}


def _flow_path_launch(actions, noise, t, path_code: int):
    shape = actions.shape
    D = shape[-1]
    N = actions.numel() // D if D else 0
    a = actions.contiguous()
    z = noise.contiguous()
    tt = t.contiguous()
    x = _host.empty(shape, actions.dtype, actions.device)
    tgt = _host.empty(shape if path_code == 0 else (0,), actions.dtype, actions.device)
    if N == 0 or D == 0:
        return x, tgt
    block_d = _host.next_pow2(D)
    block_n = min(_host.next_pow2(N), max(1, TILE // block_d))
    with _host.device_guard(actions.device):
        _flow_path_kernel[(triton.cdiv(N, block_n),)](a, z, tt, x, tgt if path_code == 0 else x, N, D,
                                                      float(_paths.VP_BETA0), float(_paths.VP_BETA1),
                                                      PATH=path_code, BLOCK_N=block_n, BLOCK_D=block_d)
    return x, tgt


@torch.library.custom_op("qipo_kernels::triton_flow_path", mutates_args=())
def _flow_path_op(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  path_code: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _flow_path_launch(actions, noise, t, path_code)


@_flow_path_op.register_fake
def _(actions, noise, t, path_code):
    return actions.new_empty(actions.shape), actions.new_empty(actions.shape if path_code == 0 else (0,))


def flow_path(actions, noise, t, path):
    """Fused reference.paths.flow_path: actions/noise [..., D], t [...] -> (x_t, target), both [..., D].

    As in the reference, the target of "ot-eps"/"vp" is ``noise`` itself. No backward (see supports).
    """
    code = _PATH_CODE[path]
    x, tgt = _flow_path_op(actions, noise, t, code)
    return x, (tgt if code == 0 else noise)


def _supports_flow_path(actions=None, noise=None, t=None, path=None, **_) -> List[str]:
    out = _host.dtype_reasons("actions", actions)
    if noise is not None and actions is not None and noise.dtype != actions.dtype:
        out.append(f"noise has dtype {noise.dtype} but actions has {actions.dtype}")
    out += _host.dtype_reasons("t", t, _host._GPU_DTYPES + (torch.float64,))
    if actions is not None and actions.dim() >= 1 and actions.shape[-1] > _host.MAX_D:
        out.append(f"action dim D = {actions.shape[-1]} > {_host.MAX_D}, the widest row one Triton tile holds")
    if _host.grad_wanted(actions, noise, t):
        out.append("an input requires grad: the Triton flow_path has no backward (the reference has)")
    return out


_backends.register("flow_matching_loss", "triton", flow_matching_loss, _supports_flow_matching_loss)
_backends.register("weighted_fm_loss", "triton", weighted_fm_loss, _supports_weighted_fm_loss)
_backends.register("flow_path", "triton", flow_path, _supports_flow_path)
