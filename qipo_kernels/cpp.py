"""The C++ CPU backend ("cpp"): registers the qipo_kernels._C kernels with qipo_kernels.backends.

What runs in C++ (float32, CPU tensors; each call is one C++ call that releases the GIL):
    integrate           ConditionalMLP, every solver (euler, midpoint, heun, rk4; ddim/dpm1/dpm2 on
                        "vp" and "ot-eps"), both x0 layouts, return_trajectory
    sample              integrate from the reference's own seeded noise draw (same samples)
    consistency_sample  one-step and multistep
    ddpm_sample         Diffusion-QL's T-step ancestral DDPM sampler (reference.ddpm), eps or x0 prediction
    act                 K candidates per state (flow or consistency) + DoubleCritic min(Q1, Q2) (with or
                        without layer_norm: LayerNorm in float32, two-pass mean / biased variance) +
                        argmax / softmax selection, in one call
    act_ext             act with a ddpm sampler or consistency sigma parameters other than CPQL's defaults
    select_action       the selection alone (argmax / softmax draw by inverse CDF)
    weighted_fm_loss, flow_matching_loss
                        forward and gradient (a torch.autograd.Function; first derivatives only)

Structure shared with the Triton kernels: the observation part of layer 1 (obs W1_obs + b1) is
computed once per state, and the time part (W1_t e(t)) once per network evaluation for all rows:
the time embedding of every evaluation time is computed here in PyTorch and passed as a table
[n_evals, H]. Solver / consistency coefficients are computed here in float64 exactly as the
reference does (qipo_kernels.reference) and rounded to float32 as torch rounds a Python scalar.

Weights are packed (transposed, zero-padded, 64-byte aligned) once per module and re-packed when
any parameter or buffer changes: its ._version (optimizer steps, load_state_dict, in-place updates),
its data_ptr (``p.data = other``) or, for writes through ``p.data`` that bypass the version counter
(``p.data.copy_(...)`` soft updates), one of four sampled elements; ``refresh(module)`` forces a
re-pack after hand edits of a few elements through ``.data``. Coefficient / time tables are cached
with the pack.

Gradients: the samplers do not backpropagate. They report a reason (so "auto" uses the reference)
when grad mode is on and the network or an input requires grad; call them under torch.no_grad()
or torch.inference_mode() (the usual case at deployment). Outputs never require grad.

Threads: torch.get_num_threads() threads for batches of more than one chunk (64 rows); one state
(or any batch up to 64 rows) runs on the calling thread. QIPO_KERNELS_NO_EXT=1 at import disables
this backend (as it does at install time).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import List, Optional

import numpy as np
import torch

if os.environ.get("QIPO_KERNELS_NO_EXT", "0") == "1":
    raise ImportError("QIPO_KERNELS_NO_EXT=1 is set: the C++ extension qipo_kernels._C is skipped "
                      "(not built at install, and disabled at import)")
try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"the C++ extension qipo_kernels._C is not built ({e}); build it with `pip install -e .` "
                      "or `python setup.py build_ext --inplace` (QIPO_KERNELS_NO_EXT=1 skips it on purpose)") from e

from . import _checks as C
from . import backends as _b
from .nets import ConditionalMLP, DoubleCritic, _Act
from .reference import ode as _ode
from .reference import consistency as _cons
from .reference import ddpm as _ddpm
from .reference.paths import alpha_sigma, inverse_log_snr, log_snr

CHUNK_ROWS = 64
_VEL_ID = {"euler": 0, "midpoint": 1, "heun": 2, "rk4": 3}
_NOISE_ID = {"ddim": 0, "dpm1": 0, "dpm2": 1}


def _empty(shape, dtype=np.float32) -> np.ndarray:
    """Allocates every output buffer the C++ writes: a numpy array (the cheapest buffer for _C to
    check), returned to the caller as a tensor sharing its memory (torch.from_numpy). Tests replace
    it to poison the outputs with NaN before the kernels run."""
    return np.empty(shape, dtype=dtype)


_T = torch.from_numpy


def _buf(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor as the extension takes it: contiguous (a copy only when it is not). _C reads the
    tensor's data pointer itself and checks dtype, device, layout and shape."""
    return t if t.is_contiguous() else t.contiguous()


class Unsupported(_b.Fallback):
    """Raised by an impl on a module the C++ backend cannot run now (e.g. its parameters changed
    dtype since the last call): ops then runs the reference (backend="auto") or raises
    RuntimeError with the reason (backend="cpp")."""


# ------------------------------------------------------------------------------------------- packing
class _Entry:
    """Everything derived from a module when it is packed, published at once (``rec.entry = e``, so
    a thread never sees half of it): the packs, the _C.Watch over the tensors (and submodules) they
    come from, the tensor slots [(dict, name)], the critic's LayerNorms and their eps values (plain
    attributes: no Watch sees them) and the cached coefficient / time tables."""
    __slots__ = ("watch", "slots", "norms", "eps", "packs", "tables")

    def __init__(self, watch, slots, norms, packs):
        self.watch, self.slots, self.norms, self.packs, self.tables = watch, slots, norms, packs, {}
        self.eps = tuple(float(n.eps) for n in norms)


class _Mod:
    """One module seen by the backend: a weakref to it and its current _Entry (None until packed)."""
    __slots__ = ("ref", "entry")

    def __init__(self, ref):
        self.ref, self.entry = ref, None


# id(module) -> _Mod. Records leave with their module (weakref callback).
_MODS: dict = {}


def _critic_linears(critic: DoubleCritic):
    return [[m for m in head.net if isinstance(m, torch.nn.Linear)] for head in (critic.q1_net, critic.q2_net)]


def _critic_norms(critic: DoubleCritic):
    """Per head, the LayerNorm after each hidden Linear ([] per head without layer_norm)."""
    return [[m for m in head.net if isinstance(m, torch.nn.LayerNorm)] for head in (critic.q1_net, critic.q2_net)]


def _critic_structure_reasons(critic: DoubleCritic) -> List[str]:
    """The heads must be nets.MLP's [Linear, (LayerNorm(H),) act] x depth + Linear, LayerNorm after every
    hidden Linear or after none, each a plain nn.LayerNorm over the hidden width."""
    for hname, head in (("q1_net", critic.q1_net), ("q2_net", critic.q2_net)):
        mods = list(head.net)
        ln = any(isinstance(m, torch.nn.LayerNorm) for m in mods)
        unit = 3 if ln else 2
        if len(mods) != unit * critic.depth + 1:
            return [f"critic.{hname} is not nets.MLP's [Linear, {'LayerNorm, ' if ln else ''}act] x depth + Linear"]
        for i in range(critic.depth):
            blk = mods[unit * i:unit * (i + 1)]
            if type(blk[0]) is not torch.nn.Linear or type(blk[-1]) is not _Act:
                return [f"critic.{hname} is not nets.MLP's [Linear, {'LayerNorm, ' if ln else ''}act] x depth + Linear"]
            if ln:
                norm = blk[1]
                if type(norm) is not torch.nn.LayerNorm:
                    return [f"critic.{hname}.net[{unit * i + 1}] is a {type(norm).__name__}, not a plain "
                            "torch.nn.LayerNorm; the C++ act implements nn.LayerNorm only"]
                if tuple(norm.normalized_shape) != (blk[0].out_features,):
                    return [f"critic.{hname}.net[{unit * i + 1}] normalizes over {tuple(norm.normalized_shape)}, "
                            f"not the hidden width ({blk[0].out_features},)"]
        if type(mods[-1]) is not torch.nn.Linear:
            return [f"critic.{hname} does not end with a Linear"]
    return []


class FastPathSkipped(UserWarning):
    """A module the C++ backend cannot run (its type or structure) sent an "auto" call to the reference."""


_WARNED: dict = {}  # id(module) -> weakref: modules already warned about (one warning per module)


def _warn_skipped(module, why: List[str]) -> None:
    """One warning per module whose type / structure keeps it off the C++ fast path (the reasons are
    also what backends.explain reports)."""
    mid = id(module)
    ref = _WARNED.get(mid)
    if ref is not None and ref() is module:
        return
    try:
        _WARNED[mid] = weakref.ref(module, lambda _r, mid=mid: _WARNED.pop(mid, None))
    except TypeError:  # not weak-referenceable: warn every time rather than never
        pass
    import warnings

    warnings.warn("qipo_kernels: the C++ fast path is skipped for this module (the PyTorch reference runs "
                  "instead, several times slower): " + "; ".join(why), FastPathSkipped, stacklevel=5)


def _type_reasons(module, kind: str) -> List[str]:
    why = _type_reasons_of(module, kind)
    if why and module is not None:
        _warn_skipped(module, why)
    return why


def _type_reasons_of(module, kind: str) -> List[str]:
    if kind == "policy":
        if not isinstance(module, ConditionalMLP):
            hint = ""
            if all(hasattr(module, k) for k in ("time_mlp", "mid_layer", "final_layer")) or hasattr(module, "betas"):
                hint = (" (a CPQL / Diffusion-QL actor: load it with qipo_kernels.make_sampler(actor, ...) or "
                        "ConditionalMLP.from_cpql_state_dict(actor.state_dict(), obs_dim, act_dim))")
            return [f"net is a {type(module).__name__}; the C++ sampler runs qipo_kernels.nets.ConditionalMLP only"
                    + hint]
        if type(module).forward is not ConditionalMLP.forward or type(module).embed_time is not ConditionalMLP.embed_time:
            return [f"net is a {type(module).__name__} that overrides forward/embed_time; the C++ sampler "
                    "implements ConditionalMLP.forward"]
        return []
    if not isinstance(module, DoubleCritic):
        hint = ""
        if hasattr(module, "q1_model") and hasattr(module, "q2_model"):
            hint = (" (a CPQL / Diffusion-QL Critic: convert it with DoubleCritic.from_cpql_state_dict(critic.state_dict(), "
                    "obs_dim=S) or DoubleCritic.from_diffusion_ql_state_dict(...))")
        return [f"critic is a {type(module).__name__}; the C++ act runs qipo_kernels.nets.DoubleCritic only" + hint]
    if type(module).q_min is not DoubleCritic.q_min or type(module).forward is not DoubleCritic.forward:
        return [f"critic is a {type(module).__name__} that overrides forward/q_min"]
    return _critic_structure_reasons(module)


def _make_slots(module, kind: str):
    if kind == "policy":
        lins = list(module.layers) + [module.out]
        if module.time_mlp is not None:
            lins += [module.time_mlp[1], module.time_mlp[3]]
    else:
        lins = [l for ls in _critic_linears(module) for l in ls]
    slots = [(lin._parameters, n) for lin in lins for n in ("weight", "bias")]
    if kind == "critic":
        # LayerNorm gamma / beta (absent with elementwise_affine=False or bias=False: 1 / 0 then)
        slots += [(ln._parameters, n) for ls in _critic_norms(module) for ln in ls for n in ("weight", "bias")
                  if ln._parameters.get(n) is not None]
    if kind == "policy" and module.time_mlp is not None:
        feats = module.time_mlp[0]
        slots += [(feats._buffers, n) for n in feats._buffers]
    return slots


def _module_slots(module):
    """[(m._modules, name)] for every submodule: the Watch compares them by identity, so that
    replacing a layer (`net.out = nn.Linear(...)`, whose old tensors stay as they were) is a change."""
    return [(m._modules, n) for m in module.modules() for n in m._modules]


def _tensor_reasons(name, slots) -> List[str]:
    for d, n in slots:
        t = d.get(n)
        if t is None:
            return [f"{name} lacks the {n!r} tensor the C++ pack reads (e.g. a Linear without bias)"]
        if t.dtype != torch.float32:
            return [f"{name}'s parameters are {t.dtype}; the C++ backend is float32 only (the reference handles it)"]
        if t.device.type != "cpu":
            return [f"{name}'s parameters are on {t.device}; the C++ backend runs on CPU"]
        if t._is_zerotensor() or t.is_neg() or t.is_conj():
            return [f"{name}'s {n!r} is a ZeroTensor or a negative / conjugate view; the C++ pack reads plain memory"]
    return []


def _build_policy_pack(net: ConditionalMLP):
    A, T = net.act_dim, net.t_dim
    with torch.no_grad():
        W1 = net.layers[0].weight
        hw = [_buf(l.weight) for l in net.layers[1:]]
        hb = [_buf(l.bias) for l in net.layers[1:]]
        return _C.Pack(_buf(W1[:, :A]), _buf(W1[:, A + T:]), _buf(net.layers[0].bias), hw, hb,
                       _buf(net.out.weight), _buf(net.out.bias), net.activation)


def _build_critic_packs(critic: DoubleCritic):
    S = critic.obs_dim
    packs = []
    with torch.no_grad():
        for lins, norms in zip(_critic_linears(critic), _critic_norms(critic)):
            W1 = lins[0].weight
            ln = {}
            if norms:
                H = lins[0].out_features
                ones, zeros = torch.ones(H), torch.zeros(H)
                ln = dict(ln_w=[_buf(n.weight if n.weight is not None else ones) for n in norms],
                          ln_b=[_buf(n.bias if n.bias is not None else zeros) for n in norms],
                          ln_eps=[float(n.eps) for n in norms])
            packs.append(_C.Pack(_buf(W1[:, S:]), _buf(W1[:, :S]), _buf(lins[0].bias),
                                 [_buf(l.weight) for l in lins[1:-1]], [_buf(l.bias) for l in lins[1:-1]],
                                 _buf(lins[-1].weight), _buf(lins[-1].bias), critic.activation, **ln))
    return packs


def _packed(module) -> Optional[_Entry]:
    """The module's current entry if it has one whose LayerNorm eps values are still the module's
    (the entry's tensors may have changed since: the Watch says)."""
    rec = _MODS.get(id(module))
    if rec is None or rec.ref() is not module:
        return None
    e = rec.entry  # (read once: another thread may replace or drop it)
    if e is None or (e.norms and e.eps != tuple(float(n.eps) for n in e.norms)):
        return None
    return e


def _grad_check(e: _Entry, kind: str):
    """(e, []) unless grad mode is on and a parameter requires grad. Slots may be stale (a
    parameter since set to None or removed): those do not count, the Watch reports them."""
    if torch.is_grad_enabled() and any(getattr(d.get(n), "requires_grad", False) for d, n in e.slots):
        name = "net" if kind == "policy" else "critic"
        return None, [f"grad mode is on and the {name}'s parameters require grad, but the C++ sampler does not "
                      "backpropagate; call it under torch.no_grad() / torch.inference_mode() for the fast path"]
    return e, []


def _prepare(module, kind: str):
    """(entry, reasons): the module's pack, re-packed when anything it was packed from changed (see
    _C.Watch: tensor versions, data pointers, sampled elements, submodule identity), or the reasons
    the C++ backend cannot run it. The unchanged case is one C++ call."""
    e = _packed(module)
    if e is not None and not e.watch.changed():  # (Watch.changed never raises)
        return _grad_check(e, kind)
    return _prepare_slow(module, kind)


def _prepare_slow(module, kind: str):
    """Look at the module afresh (type, structure, tensors) and pack it."""
    mid = id(module)
    rec = _MODS.get(mid)
    if rec is not None and rec.ref() is module:
        rec.entry = None
    why = _type_reasons(module, kind)
    if why:
        return None, why
    if rec is None or rec.ref() is not module:
        rec = _Mod(weakref.ref(module, lambda _r, mid=mid: _MODS.pop(mid, None)))
        _MODS[mid] = rec
    slots = _make_slots(module, kind)
    why = _tensor_reasons("net" if kind == "policy" else "critic", slots)
    if why:
        return None, why
    watch = _C.Watch(_module_slots(module) + slots)  # the state the pack is built from
    packs = [_build_policy_pack(module)] if kind == "policy" else _build_critic_packs(module)
    e = _Entry(watch, slots, [n for ns in _critic_norms(module) for n in ns] if kind == "critic" else [], packs)
    rec.entry = e
    return _grad_check(e, kind)


def refresh(module=None) -> None:
    """Drop the packed weights of ``module`` (every module when None): the next call re-packs.

    Never needed after optimizer steps, ``load_state_dict``, in-place updates under no_grad,
    ``p.data = ...``, whole-tensor writes through ``p.data`` (soft / EMA target updates) or a
    replaced layer: the pack notices those by itself. Needed only after editing a few elements
    through ``.data`` (e.g. ``p.data[3, 7] = 0.0``), which no version counter records.
    """
    if module is None:
        for rec in list(_MODS.values()):
            rec.entry = None
    else:
        rec = _MODS.get(id(module))
        if rec is not None and rec.ref() is module:
            rec.entry = None


def _module_reasons(module, kind: str) -> List[str]:
    """supports(): the full check, the pack's staleness included (backends.reasons / explain)."""
    return _prepare(module, kind)[1]


def _ready_reasons(module, kind: str) -> List[str]:
    """fast_supports(), on every dispatch: the module was packed before and nothing that is not a
    tensor changed; whether the pack is still current is left to the C++ call itself, which checks
    the pack's Watch before it computes (one C++ call per sampler call instead of two)."""
    e = _packed(module)
    if e is not None:
        return _grad_check(e, kind)[1]
    return _prepare(module, kind)[1]


def _entry(module, kind: str) -> _Entry:
    """The module's current pack for an impl (packed now if it never was). It may be stale: the impls
    pass its watch to the C++ call and re-pack with _repack when that reports a change."""
    e = _packed(module)
    return e if e is not None else _repack(module, kind)


def _repack(module, kind: str) -> _Entry:
    """Validate (re-packing what changed) or raise Unsupported with the reasons."""
    e, why = _prepare(module, kind)
    if why:
        raise Unsupported("the C++ backend cannot run this call: " + "; ".join(why))
    return e


_F32 = torch.float32


def _input_reasons(**tensors) -> List[str]:
    # fast path: every tensor float32 and no gradient wanted
    if not torch.is_grad_enabled() and all(t is None or t.dtype is _F32 for t in tensors.values()):
        return []
    out = []
    grad = torch.is_grad_enabled()
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != torch.float32:
            out.append(f"{name} is {t.dtype}; the C++ backend is float32 only (the reference handles {t.dtype})")
        elif grad and t.requires_grad:
            out.append(f"{name} requires grad and grad mode is on, but the C++ sampler does not backpropagate")
    return out


# ------------------------------------------------------------------------------------------- tables
def _time_share(net: ConditionalMLP, times) -> np.ndarray:
    """W1_t e(t) for every evaluation time: [n_evals, H] float32 (e(t) computed by the module itself)."""
    A, T = net.act_dim, net.t_dim
    with torch.no_grad():
        tt = times if torch.is_tensor(times) else torch.tensor(times, dtype=torch.float32)
        e = net.embed_time(tt)
        return (e @ net.layers[0].weight[:, A:A + T].t()).contiguous().numpy()


def _flow_tables(net, entry, steps, solver, t0, t1, path):
    key = ("flow", steps, solver, float(t0), float(t1), path)
    tab = entry.tables.get(key)
    if tab is not None:
        return tab
    a, b = _ode.time_grid(steps, float(t0), float(t1), solver, path)
    h = (b - a) / steps
    times = []
    if solver in _ode.VELOCITY_SOLVERS:
        kind, sid = "velocity", _VEL_ID[solver]
        coef = np.array([h, 0.5 * h, h / 6.0], dtype=np.float32)
        for i in range(steps):
            t = a + i * h
            times += {"euler": [t], "midpoint": [t, t + 0.5 * h], "heun": [t, t + h],
                      "rk4": [t, t + 0.5 * h, t + 0.5 * h, t + h]}[solver]
    else:
        kind, sid = "noise", _NOISE_ID[solver]
        rows = []
        for i in range(steps):
            t = a + i * h
            t_next = a + (i + 1) * h if i + 1 < steps else b
            # the same float64 arithmetic as reference.ode._noise_step
            tt, tn = torch.tensor(t, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)
            a_t, s_t = alpha_sigma(tt, path)
            a_n, s_n = alpha_sigma(tn, path)
            times.append(t)
            if solver in ("ddim", "dpm1"):
                rows.append([float(s_t), float(a_t), float(s_n / s_t),
                             float(a_n * (1.0 - (s_n * a_t) / (a_n * s_t))), 0.0, 1.0, 0.0, 0.0])
            else:
                lam_t, lam_n = log_snr(tt, path), log_snr(tn, path)
                hh = lam_n - lam_t
                tm = inverse_log_snr(lam_t + 0.5 * hh, path)
                a_m, s_m = alpha_sigma(tm, path)
                phi_m = torch.expm1(-0.5 * hh)
                phi_n = -(1.0 - (s_n * a_t) / (a_n * s_t))
                rows.append([float(s_t), float(a_t), float(s_n / s_t), float(a_n * phi_n),
                             float(s_m), float(a_m), float(s_m / s_t), float(a_m * phi_m)])
                times.append(float(tm))
        coef = np.array(rows, dtype=np.float32)
    tab = (kind, sid, steps, _time_share(net, times), coef)
    entry.tables[key] = tab
    return tab


def _consistency_tables(net, entry, sigmas, sigma_max, sigma_min, sigma_data):
    key = (None if sigmas is None else tuple(sigmas), sigma_max, sigma_min, sigma_data)  # flow keys start "flow"
    tab = entry.tables.get(key)
    if tab is not None:
        return tab
    levels = [sigma_max] + list(sigmas or ())
    # float32 scalings and time input, computed by the reference's own functions on float32 tensors
    s32 = torch.tensor(levels, dtype=torch.float32)
    c_skip, c_out, c_in = _cons.scalings(s32, sigma_data, sigma_min)
    tin = _cons.time_input(s32)
    xsc = [sigma_max] + [math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) for s in levels[1:]]
    coef = np.stack([np.array(xsc, dtype=np.float32), c_in.numpy(), c_skip.numpy(), c_out.numpy()], axis=1)
    tab = ("consistency", 0, len(levels), _time_share(net, tin), np.ascontiguousarray(coef, dtype=np.float32))
    entry.tables[key] = tab
    return tab


# ------------------------------------------------------------------------------------------- integrate
def _integrate_supports(module_reasons):
    def supports(net=None, x0=None, obs=None, steps=None, solver=None, path=None, return_trajectory=False,
                 **_) -> List[str]:
        why = module_reasons(net, "policy")
        if why:
            return why
        if x0.dtype is _F32 and obs.dtype is _F32 and not torch.is_grad_enabled():
            return why
        return _input_reasons(x0=x0, obs=obs)
    return supports


# supports (full: backends.reasons / explain) and fast_supports (ops dispatch; staleness left to _C)
_supports_integrate = _integrate_supports(_module_reasons)
_fast_supports_integrate = _integrate_supports(_ready_reasons)


def integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory):
    """reference.ode._integrate in C++: x0 [N, A] (obs [N, S]) or [B, K, A] (obs [B, S]) -> x0's shape."""
    e = _entry(net, "policy")
    shape = tuple(x0.shape)
    K = shape[1] if len(shape) == 3 else 1
    out = _empty(shape)
    traj = _empty((steps + 1,) + shape) if return_trajectory else None
    obs, x0 = _buf(obs), _buf(x0)
    for first in (True, False):
        kind, sid, nst, ttab, coef = _flow_tables(net, e, steps, solver, t0, t1, path)
        if _C.sample(e.packs[0], obs, x0, K, kind, sid, nst, ttab, coef, None, False, out, traj,
                     torch.get_num_threads(), CHUNK_ROWS, e.watch if first else None):
            break
        e = _repack(net, "policy")  # the weights changed since the last call
    if return_trajectory:
        return _T(out), _T(traj)
    return _T(out)


# ------------------------------------------------------------------------------------------- sample
def _sample_supports(module_reasons):
    def supports(net=None, obs=None, **_) -> List[str]:
        return module_reasons(net, "policy") or _input_reasons(obs=obs)
    return supports


_supports_sample = _sample_supports(_module_reasons)
_fast_supports_sample = _sample_supports(_ready_reasons)


def sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory):
    """reference.ode._sample in C++: the noise is drawn by the reference's own draw (the same
    torch.Generator seeded with ``seed``, the same numbers), then integrated here: the same
    samples as backend="torch" to float32 rounding. obs [B, S] -> [B, num_samples, A]."""
    x0 = _ode.sample_noise(net, obs, num_samples, seed)
    return integrate(net, x0, obs, steps, solver, 0.0, 1.0, path, return_trajectory)


# ------------------------------------------------------------------------------------------- consistency
def _consistency_supports(module_reasons):
    def supports(net=None, noise=None, obs=None, sigmas=None, step_noise=None, clip=True) -> List[str]:
        why = module_reasons(net, "policy")
        if why:
            return why
        if step_noise is None and noise.dtype is _F32 and obs.dtype is _F32 and not torch.is_grad_enabled():
            return why  # the one-state real-time case, without building _input_reasons' arguments
        return _input_reasons(noise=noise, obs=obs, step_noise=step_noise)
    return supports


_supports_consistency = _consistency_supports(_module_reasons)
_ready_supports_consistency = _consistency_supports(_ready_reasons)


def _fast_supports_consistency(net=None, noise=None, obs=None, sigmas=None, step_noise=None, clip=True):
    # the one-state real-time case with _ready_reasons inlined (a policy record has no LayerNorms)
    rec = _MODS.get(id(net))
    if (rec is not None and rec.ref() is net and rec.entry is not None and step_noise is None
            and noise.dtype is _F32 and obs.dtype is _F32 and not torch.is_grad_enabled()):
        return []
    return _ready_supports_consistency(net, noise, obs, sigmas, step_noise, clip)


def _step_noise(step_noise, sigmas, R, A, dtype, device, generator):
    """Re-noise draws [len(sigmas), R, A] (given ones may be [len(sigmas), B, K, A]): given, or drawn in
    the reference's order."""
    if not sigmas:
        return None
    if step_noise is not None:
        return step_noise
    return torch.stack([torch.randn((R, A), dtype=dtype, device=device, generator=generator) for _ in sigmas])


def consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator):
    """reference.consistency._consistency_sample in C++: noise [N, A] or [B, K, A] -> same shape."""
    rec = _MODS.get(id(net))  # (_entry and the table lookup inlined: the one-state real-time path;
    e = rec.entry if rec is not None and rec.ref() is net else None  # a policy entry has no LayerNorms)
    if e is None:
        e = _entry(net, "policy")
    tab = e.tables.get((None if sigmas is None else tuple(sigmas), sigma_max, sigma_min, sigma_data))
    kind, sid, nst, ttab, coef = tab or _consistency_tables(net, e, sigmas, sigma_max, sigma_min, sigma_data)
    shape = noise.shape
    K = shape[1] if len(shape) == 3 else 1
    sn = None
    if sigmas:
        if step_noise is None:  # validated before drawing: a Fallback must leave the generator untouched
            e = _repack(net, "policy")
            kind, sid, nst, ttab, coef = _consistency_tables(net, e, sigmas, sigma_max, sigma_min, sigma_data)
        sn = _step_noise(step_noise, sigmas, shape[0] * K, shape[-1], noise.dtype, noise.device, generator)
    out = _empty(shape)
    # (_buf inlined: this is the one-state real-time path)
    obs = obs if obs.is_contiguous() else obs.contiguous()
    noise = noise if noise.is_contiguous() else noise.contiguous()
    sn = None if sn is None else _buf(sn)
    if not _C.sample(e.packs[0], obs, noise, K, kind, sid, nst, ttab, coef, sn, bool(clip), out, None,
                     torch.get_num_threads(), CHUNK_ROWS, e.watch):
        e = _repack(net, "policy")  # the weights changed since the last call
        kind, sid, nst, ttab, coef = _consistency_tables(net, e, sigmas, sigma_max, sigma_min, sigma_data)
        _C.sample(e.packs[0], obs, noise, K, kind, sid, nst, ttab, coef, sn, bool(clip), out, None,
                  torch.get_num_threads(), CHUNK_ROWS)
    return _T(out)


# ------------------------------------------------------------------------------------------- ddpm
def _ddpm_tables(net, entry, schedule, max_action, predict_epsilon, clip_denoised, clip):
    """(kind, solver id, steps, time table, coef [T, 8]) of reference.ddpm._ddpm_sample; the
    coefficients are the schedule's float32 values, eval e = step i = T-1-e."""
    rows = schedule.rows()
    key = ("ddpm", rows, max_action, predict_epsilon, clip_denoised, clip)
    tab = entry.tables.get(key)
    if tab is not None:
        return tab
    T = len(rows)
    inf = math.inf
    lo, hi = (-max_action, max_action) if clip_denoised else (-inf, inf)
    bound = max_action if clip else inf
    coef = np.array([[cr, crm1, c1, c2, sd if i > 0 else 0.0, lo, hi, bound]
                     for i, (cr, crm1, c1, c2, sd) in ((i, rows[i]) for i in range(T - 1, -1, -1))], dtype=np.float32)
    ttab = _time_share(net, torch.tensor(_ddpm.ddpm_time_inputs(T), dtype=torch.float32))
    tab = ("ddpm", int(bool(predict_epsilon)), T, ttab, coef)
    entry.tables[key] = tab
    return tab


def _ddpm_supports(module_reasons):
    def supports(net=None, noise=None, obs=None, schedule=None, step_noise=None, **_) -> List[str]:
        why = module_reasons(net, "policy")
        if why:
            return why
        return _input_reasons(noise=noise, obs=obs, step_noise=step_noise)
    return supports


_supports_ddpm = _ddpm_supports(_module_reasons)
_fast_supports_ddpm = _ddpm_supports(_ready_reasons)


def ddpm_sample(net, noise, obs, schedule, step_noise, max_action, predict_epsilon, clip_denoised, clip, generator):
    """reference.ddpm._ddpm_sample in C++: noise [N, A] or [B, K, A] -> same shape. The step noise
    (when not given) is drawn here from ``generator`` in the reference's order, after the module is
    validated (a Fallback leaves the generator untouched)."""
    e = _repack(net, "policy")
    shape = noise.shape
    K = shape[1] if len(shape) == 3 else 1
    T = schedule.n_timesteps
    R, A = shape[0] * K, shape[-1]
    if step_noise is None and T > 1:
        step_noise = torch.stack([torch.randn((R, A), dtype=noise.dtype, device=noise.device, generator=generator)
                                  for _ in range(T - 1)])
    sn = None if T == 1 else _buf(step_noise)
    out = _empty(shape)
    obs, noise = _buf(obs), _buf(noise)
    for first in (True, False):
        kind, sid, nst, ttab, coef = _ddpm_tables(net, e, schedule, max_action, predict_epsilon, clip_denoised, clip)
        if _C.sample(e.packs[0], obs, noise, K, kind, sid, nst, ttab, coef, sn, False, out, None,
                     torch.get_num_threads(), CHUNK_ROWS, e.watch if first else None):
            break
        e = _repack(net, "policy")  # the weights changed since the last call
    return _T(out)


# ------------------------------------------------------------------------------------------- act
def _act_supports(module_reasons):
    def supports(net=None, critic=None, obs=None, num_candidates=None, sampler=None, steps=None, solver=None,
                 path=None, sigmas=None, mode=None, noise=None, **_) -> List[str]:
        why = module_reasons(net, "policy") or module_reasons(critic, "critic")
        if why:
            return why
        if critic.obs_dim != net.obs_dim or critic.act_dim != net.act_dim:
            return [f"critic takes obs_dim {critic.obs_dim}, act_dim {critic.act_dim} but net has "
                    f"{net.obs_dim}, {net.act_dim}"]
        return _input_reasons(obs=obs, noise=noise)
    return supports


_supports_act = _act_supports(_module_reasons)
_fast_supports_act = _act_supports(_ready_reasons)


def _supports_act_ext_with(module_reasons):
    base = _act_supports(module_reasons)

    def supports(step_noise=None, **kw) -> List[str]:
        return base(**kw) or _input_reasons(step_noise=step_noise)
    return supports


_supports_act_ext = _supports_act_ext_with(_module_reasons)
_fast_supports_act_ext = _supports_act_ext_with(_ready_reasons)


def act_ext(net, critic, obs, num_candidates, sampler, sargs, mode, temperature, noise, step_noise, uniform, generator,
            clip, _debug: Optional[dict] = None):
    """ops._act_ext_ref in one C++ call: a DDPM sampler (sargs = (schedule, max_action, predict_epsilon,
    clip_denoised)) or consistency with given sigma parameters (sargs = (sigmas, sigma_max, sigma_min,
    sigma_data))."""
    sigmas = sargs[0] if sampler == "consistency" else None
    return act(net, critic, obs, num_candidates, sampler, None, None, None, sigmas, mode, temperature, noise,
               step_noise, uniform, generator, clip, 0.0, _debug, _sargs=sargs)


def act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature, noise,
        step_noise, uniform, generator, clip, t0=0.0, _debug: Optional[dict] = None, _sargs=None):
    """ops._act_ref in one C++ call: obs [B, S] -> actions [B, A].

    Flow integrates from ``t0``: the time / coefficient tables are integrate's (_flow_tables on
    [t0, 1]) and the noise is scaled by sigma(t0) here, as the reference scales it
    (reference.ode.start_noise), so _C.act itself has no notion of t0.

    Random draws (noise, re-noise, the softmax uniform) are made here with ``generator`` in the
    reference's order, so both backends give the same action on the same generator state.
    ``_debug`` (tests): a dict that receives the candidates [B, K, A], q [B, K] and index [B].
    """
    # fully validated (re-packed if stale) before anything is drawn from the generator: a Fallback
    # must leave the generator as the reference will find it (act's compute dwarfs the two checks)
    pe = _repack(net, "policy")
    ce = _repack(critic, "critic")
    B, K, A = obs.shape[0], num_candidates, net.act_dim
    R = B * K
    if noise is None:
        noise = torch.randn((B, K, A), dtype=obs.dtype, device=obs.device, generator=generator)
    if sampler == "flow":
        noise = _ode.start_noise(noise, t0, path)

    def tables(pe):
        if sampler == "flow":
            return _flow_tables(net, pe, steps, solver, t0, 1.0, path)
        if sampler == "ddpm":
            return _ddpm_tables(net, pe, _sargs[0], _sargs[1], _sargs[2], _sargs[3], clip)
        smax, smin, sdata = _sargs[1:] if _sargs is not None else (_cons.SIGMA_MAX, _cons.SIGMA_MIN, _cons.SIGMA_DATA)
        return _consistency_tables(net, pe, sigmas, smax, smin, sdata)

    if sampler == "flow":
        sn = None
    elif sampler == "ddpm":  # the T - 1 step draws, in the reference's order
        sn = _step_noise(step_noise, [None] * (_sargs[0].n_timesteps - 1), R, A, noise.dtype, noise.device, generator)
    else:
        sn = _step_noise(step_noise, sigmas, R, A, noise.dtype, noise.device, generator)
    u = None
    if mode == "softmax":
        if uniform is None:
            uniform = torch.rand(B, dtype=torch.float64, device=obs.device, generator=generator)
        u = uniform.detach().to(torch.float64).contiguous().numpy()
    out = _empty((B, A))
    cand = q = None
    idx = _empty((B,), np.int64)  # always: -1 marks a state whose candidates got a NaN / inf score
    if _debug is not None:
        cand, q = _empty((B, K, A)), _empty((B, K))
    obs, noise, sn = _buf(obs), _buf(noise), None if sn is None else _buf(sn)
    for first in (True, False):
        kind, sid, nst, ttab, coef = tables(pe)
        # (ddpm: the clamp to the action bound is the sampler's own, in its coefficients)
        if _C.act(pe.packs[0], ce.packs[0], ce.packs[1], obs, noise, K, kind, sid, nst, ttab, coef, sn,
                  bool(clip) and sampler != "ddpm",
                  mode, float(temperature), u, out, None if q is None else q.reshape(R), idx, cand,
                  torch.get_num_threads(), CHUNK_ROWS, pe.watch if first else None, ce.watch if first else None):
            break
        pe, ce = _repack(net, "policy"), _repack(critic, "critic")  # weights changed since the last call
    if B and idx.min() < 0:  # the reference's error, with the same message
        C.nonfinite_q_states(np.flatnonzero(idx < 0).tolist(), B)
    if _debug is not None:
        _debug.update(candidates=_T(cand), q=_T(q), index=_T(idx))
    return _T(out)


# ------------------------------------------------------------------------------------------- select_action
def _supports_select(q_values=None, candidates=None, mode=None, **_) -> List[str]:
    out = [f"{name} is {t.dtype}; the C++ select_action is float32 only (the reference handles {t.dtype})"
           for name, t in (("q_values", q_values), ("candidates", candidates)) if t.dtype is not _F32]
    if torch.is_grad_enabled() and candidates.requires_grad:
        out.append("candidates require grad and grad mode is on; the C++ select_action does not backpropagate "
                   "(the reference's output carries the gradient)")
    return out


def select_action(q_values, candidates, mode, temperature, uniform, generator):
    """ops._select_ref in C++: q_values [B, K], candidates [B, K, D] -> [B, D]; the softmax draw
    (when uniform is None) is made here from ``generator`` as the reference makes it."""
    B, _, D = candidates.shape
    u = None
    if mode == "softmax":
        if uniform is None:
            uniform = torch.rand(B, dtype=torch.float64, device=q_values.device, generator=generator)
        u = _buf(uniform.detach().to(torch.float64))
    out = _empty((B, D))
    _C.select_action(_buf(q_values), _buf(candidates), mode, float(temperature), u, out)
    return _T(out)


# ------------------------------------------------------------------------------------------- losses
class _FMLoss(torch.autograd.Function):
    """loss = sum_bm w_bm lambda_bm |pred - tgt|^2 computed in C++ with its gradient in the same pass.

    mode "target": tgt = a (the target); "ot": tgt = a - z; "eps": tgt = a (= the noise z).
    """

    @staticmethod
    def forward(ctx, pred, a, z, energy, pair_weight, beta, normalize, mode):
        need_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        B, M, D = pred.shape
        grad = _empty((B, M, D)) if need_grad else None
        sq = _empty((B, M)) if ctx.needs_input_grad[4] else None
        w = _empty((B, M)) if ctx.needs_input_grad[4] else None
        e = None if energy is None else _buf(energy.detach().to(torch.float32))
        loss = _C.fm_loss(_buf(pred), _buf(a), None if z is None else _buf(z), e, float(beta), normalize,
                          None if pair_weight is None else _buf(pair_weight), grad, sq, w, torch.get_num_threads())
        grad, sq, w = (None if b is None else _T(b) for b in (grad, sq, w))
        ctx.mode = mode
        ctx.save_for_backward(grad, sq, w)
        return torch.tensor(loss, dtype=pred.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grad, sq, w = ctx.saved_tensors
        n = ctx.needs_input_grad
        gp = grad * g if n[0] else None
        ga = -grad * g if n[1] else None
        gz = None
        if n[2]:  # only in mode "ot": tgt = a - z
            gz = grad * g
        gl = sq * w * g if n[4] else None
        return gp, ga, gz, None, gl, None, None, None


def _supports_loss(pred=None, target=None, energy=None, pair_weight=None, actions=None, noise=None, **_) -> List[str]:
    out = []
    for name, t in (("pred", pred), ("target", target), ("actions", actions), ("noise", noise),
                    ("pair_weight", pair_weight)):
        if t is not None and t.dtype != torch.float32:
            out.append(f"{name} is {t.dtype}; the C++ loss is float32 only (the reference handles {t.dtype})")
    if energy is not None and energy.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        out.append(f"energy is {energy.dtype}")
    return out


def weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight):
    """reference.loss._weighted_fm_loss with a C++ forward + gradient; pred/target [B, M, D] -> scalar."""
    return _FMLoss.apply(pred, target, None, energy, pair_weight, beta, normalize, "target")


def flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight):
    """reference.loss._flow_matching_loss: the target (a - z for "ot", z otherwise) is formed in C++."""
    if path == "ot":
        return _FMLoss.apply(pred, actions, noise, energy, pair_weight, beta, normalize, "ot")
    return _FMLoss.apply(pred, noise, None, energy, pair_weight, beta, normalize, "eps")


_b.register("integrate", "cpp", integrate, _supports_integrate, _fast_supports_integrate)
_b.register("sample", "cpp", sample, _supports_sample, _fast_supports_sample)
_b.register("consistency_sample", "cpp", consistency_sample, _supports_consistency, _fast_supports_consistency)
_b.register("ddpm_sample", "cpp", ddpm_sample, _supports_ddpm, _fast_supports_ddpm)
_b.register("act", "cpp", act, _supports_act, _fast_supports_act)
_b.register("act_ext", "cpp", act_ext, _supports_act_ext, _fast_supports_act_ext)
_b.register("select_action", "cpp", select_action, _supports_select)
_b.register("weighted_fm_loss", "cpp", weighted_fm_loss, _supports_loss)
_b.register("flow_matching_loss", "cpp", flow_matching_loss, _supports_loss)
