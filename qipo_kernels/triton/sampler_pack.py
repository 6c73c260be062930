"""Weight packing for the fused samplers, and the eager-mode cache of packed weights.

Packed layout of one MLP (see _mlp_tensors): the first layer split in a 'free' part (x / action,
read at every evaluation) and an obs part (multiplied with the tile's obs rows at every evaluation), weights
transposed to [in, out] and zero-padded, biases / LayerNorm affine in float32.

The packed tensors are built from the modules' current parameters by plain torch ops: under
torch.compile these functions are traced into the graph (they read the live parameters, so an
optimizer step between compiled calls is never missed); eagerly the result is cached per
(module, dtype, device) in an ``Entry`` that also holds the solver tables and launch plans derived
from it.

Cache validity without walking the module on every call: an Entry keeps a *watch* over every
tensor slot (m._parameters / m._buffers of every submodule) and every submodule slot
(m._modules, compared by identity, so ``net.out = nn.Linear(...)`` is a change). ``changed()`` is
true once a tensor's ``_version`` moved (optimizer steps, load_state_dict, in-place updates), its
data pointer moved (``p.data = other``, ``.to()``), a slot holds another object or a dict gained
or lost a key. The C++ extension's ``_C.Watch`` does this in one C call (and also compares four
sampled elements of float32 CPU tensors); without the extension a Python twin does the same
comparisons. A write through ``p.data`` (``p.data.copy_(...)``) bypasses the version counter:
call ``refresh(module)`` after one (or use an optimizer / ``load_state_dict``, which are seen).
"""
from __future__ import annotations

import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nets import ConditionalMLP, DoubleCritic


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pad_hidden(h: int) -> int:
    """Padded hidden width: a power of two >= 16. The kernel holds a whole hidden row block
    [BM, HP] in registers (mlp.mlp_eval), and Triton tensors have power-of-two shapes."""
    return max(16, _next_pow2(h))


def _pad_small(n: int) -> int:
    """Padded obs / action width: a power of two >= 16 (tl.dot's K; the obs tile and the state x are
    register tensors [BM, SP] / [BM, AP])."""
    return max(16, _next_pow2(n))


def _pad2(w: torch.Tensor, rows: int, cols: int, dtype, device) -> torch.Tensor:
    w = w.to(device=device, dtype=dtype)
    return F.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0])).contiguous()


def _pad1(b: torch.Tensor, n: int, device) -> torch.Tensor:
    return F.pad(b.to(device=device, dtype=torch.float32), (0, n - b.shape[0])).contiguous()


def _mlp_tensors(linears: List[nn.Linear], free_cols: slice, obs_cols: slice, out_pad: int,
                 dtype: torch.dtype, device: torch.device,
                 norms: Optional[List[nn.LayerNorm]] = None) -> List[torch.Tensor]:
    """Packed weights of one MLP with the first layer split in a 'free' part (x / action, read each
    evaluation) and an obs part (the layer-1 GEMM's obs columns, K = SP):

        [w1x [AP, HP], w1o [SP, HP], b1 [HP], wh [max(depth - 1, 1), HP, HP], bh [.., HP], wo [out_pad, HP],
         bo [out_pad]]  (+ [lnw, lnb] [depth, HP] when ``norms``: LayerNorm after each hidden Linear)

    Layer 1's two parts are transposed ([in, out]); the hidden and output weights keep nn.Linear's
    [out, in] layout, which is K-major for both of their roles in the kernel's feature-major layer
    pairing (the A operand of W @ h and of W[:, block] @ act(block)), as tensor cores want for tf32.
    Weights in ``dtype``, biases / LayerNorm affine in float32, zero padding.
    """
    first, hidden, last = linears[0], linears[1:-1], linears[-1]
    H = first.weight.shape[0]
    HP = _pad_hidden(H)
    AP = _pad_small(free_cols.stop - free_cols.start)
    SP = _pad_small(obs_cols.stop - obs_cols.start)
    with torch.no_grad():
        W1 = first.weight.detach()
        w1x = _pad2(W1[:, free_cols].t(), AP, HP, dtype, device)
        w1o = _pad2(W1[:, obs_cols].t(), SP, HP, dtype, device)
        b1 = _pad1(first.bias.detach(), HP, device)
        if hidden:
            wh = torch.stack([_pad2(lin.weight.detach(), HP, HP, dtype, device) for lin in hidden])
            bh = torch.stack([_pad1(lin.bias.detach(), HP, device) for lin in hidden])
        else:
            wh = torch.zeros(1, HP, HP, dtype=dtype, device=device)
            bh = torch.zeros(1, HP, dtype=torch.float32, device=device)
        wo = _pad2(last.weight.detach(), out_pad, HP, dtype, device)
        bo = _pad1(last.bias.detach(), out_pad, device)
        out = [w1x, w1o, b1, wh, bh, wo, bo]
        if norms:
            ones = torch.ones(H, dtype=torch.float32, device=device)
            zeros = torch.zeros(H, dtype=torch.float32, device=device)
            out.append(torch.stack([_pad1(ln.weight.detach() if ln.weight is not None else ones, HP, device)
                                    for ln in norms]))
            out.append(torch.stack([_pad1(ln.bias.detach() if ln.bias is not None else zeros, HP, device)
                                    for ln in norms]))
    return out


def _policy_tensors(net: ConditionalMLP, dtype, device) -> List[torch.Tensor]:
    """The policy's 7 packed tensors (see _mlp_tensors); depth = len(net.layers)."""
    A, T, S = net.act_dim, net.t_dim, net.obs_dim
    return _mlp_tensors(list(net.layers) + [net.out], slice(0, A), slice(A + T, A + T + S), _pad_small(A),
                        dtype, device)


def _critic_tensors(critic: DoubleCritic, dtype, device) -> List[torch.Tensor]:
    """Both heads' packed tensors, head 1 then head 2 (7 each, 9 with LayerNorm)."""
    S, A = critic.obs_dim, critic.act_dim
    out: List[torch.Tensor] = []
    for mlp in (critic.q1_net, critic.q2_net):
        lins = [m for m in mlp.net if isinstance(m, nn.Linear)]
        norms = [m for m in mlp.net if isinstance(m, nn.LayerNorm)]
        out += _mlp_tensors(lins, slice(S, S + A), slice(0, S), 16, dtype, device, norms)
    return out


def _critic_meta(critic: DoubleCritic) -> Tuple[int, int, bool, float]:
    """(depth, hidden, layer_norm, LayerNorm eps) of the critic heads."""
    norms = [m for m in critic.q1_net.net if isinstance(m, nn.LayerNorm)]
    return critic.depth, critic.hidden, bool(norms), float(norms[0].eps) if norms else 0.0


# ----------------------------------------------------------------------------------------------
# The eager-mode cache
# ----------------------------------------------------------------------------------------------
def _load_c_watch():
    if os.environ.get("QIPO_KERNELS_NO_EXT", "0") == "1":
        return None
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, "Watch", None)


_CWatch = _load_c_watch()


def _version(t) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class PyWatch:
    """The Python twin of _C.Watch (tensor version + data pointer, submodule identity, dict sizes)."""
    __slots__ = ("items",)

    def __init__(self, slots):
        items = []
        for d, n in slots:
            v = d[n]
            if torch.is_tensor(v):
                items.append((d, n, v, _version(v), v.data_ptr(), -1))
            else:
                items.append((d, n, v, 0, 0, len(d)))
        self.items = items

    def changed(self) -> bool:
        try:
            for d, n, v, ver, ptr, size in self.items:
                t = d[n]
                if t is not v:
                    return True
                if size >= 0:
                    if len(d) != size:
                        return True
                elif t._version != ver or t.data_ptr() != ptr:
                    return True
        except (KeyError, RuntimeError):
            return True
        return False

    def __len__(self):
        return len(self.items)


def watch_slots(module: nn.Module) -> list:
    """Every (dict, name) a pack of ``module`` depends on: submodules, parameters and buffers."""
    slots = []
    for m in module.modules():
        slots += [(m._modules, n) for n in m._modules]
        slots += [(m._parameters, n) for n in m._parameters]
        slots += [(m._buffers, n) for n in m._buffers]
    return slots


def make_watch(module: nn.Module):
    slots = watch_slots(module)
    if _CWatch is not None:
        try:
            return _CWatch(slots)
        except (TypeError, ValueError, RuntimeError):
            pass
    return PyWatch(slots)


class _Stale:
    """The watch of a dropped entry: always changed."""

    def changed(self) -> bool:
        return True


_STALE = _Stale()


class Entry:
    """A packed copy of a module for one (dtype, device): ``tensors`` (see _policy_tensors /
    _critic_tensors), the ``watch`` over what they were built from, ``ok`` (every parameter was
    already in this dtype and on this device: the supports() check is then answered from here),
    ``tables`` (per solver configuration: time share and coefficients), ``plans`` (per launch
    configuration, see sampler_launch) and, for a critic, ``meta`` (see current_meta)."""
    __slots__ = ("watch", "tensors", "tables", "plans", "ok", "meta", "norms", "__weakref__")

    def __init__(self, module: nn.Module, kind: str, dtype: torch.dtype, device: torch.device):
        self.watch = make_watch(module)  # before packing: a change while packing is then seen
        build = _policy_tensors if kind == "policy" else _critic_tensors
        self.tensors = build(module, dtype, device)
        self.ok = all(p.dtype == dtype and p.device == device for p in module.parameters())
        self.tables: Dict[Tuple, tuple] = {}
        self.plans: Dict[Tuple, tuple] = {}
        # critic: (depth, hidden, layer_norm, eps) and its LayerNorms (eps is an attribute, not a
        # tensor: current_meta compares it on every call)
        self.meta = _critic_meta(module) if kind == "critic" else None
        self.norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)] if kind == "critic" else []

    def current_meta(self):
        """The critic's (depth, hidden, layer_norm, eps), None when an eps changed since packing."""
        eps = self.meta[3]
        for n in self.norms:
            if n.eps != eps:
                return None
        return self.meta


_PACKS: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()
_MAX_TABLES = 64


def peek(module: nn.Module, dtype: torch.dtype, device: torch.device) -> Optional[Entry]:
    """The module's current entry for (dtype, device), or None (none yet, or the module changed)."""
    ents = _PACKS.get(module)
    if ents is None:
        return None
    e = ents.get((dtype, device))
    if e is None or e.watch.changed():
        return None
    return e


def get_pack(module: nn.Module, kind: str, dtype: torch.dtype, device: torch.device) -> Entry:
    """The cached packed copy of ``module`` ("policy" or "critic") for (dtype, device), re-packed
    when anything it was built from changed."""
    ents = _PACKS.get(module)
    if ents is None:
        ents = _PACKS.setdefault(module, {})
    key = (dtype, device)
    e = ents.get(key)
    if e is None or e.watch.changed():
        e = Entry(module, kind, dtype, device)
        ents[key] = e
    return e


def refresh(module: Optional[nn.Module] = None) -> None:
    """Drop the packed copies of ``module`` (of every module when None); the next call re-packs.
    Needed only after writes through ``p.data`` that no version counter records."""
    mods = list(_PACKS.keys()) if module is None else [module]
    for m in mods:
        for e in (_PACKS.pop(m, None) or {}).values():
            e.watch = _STALE  # a prepared call holding the entry sees it as changed


def cached_table(entry: Entry, key, build):
    """entry.tables[key], built by ``build()`` on first use (at most _MAX_TABLES kept)."""
    tab = entry.tables.get(key)
    if tab is None:
        if len(entry.tables) >= _MAX_TABLES:
            entry.tables.clear()
            entry.plans.clear()
        tab = build()
        entry.tables[key] = tab
    return tab
