"""Argument checks shared by the references and the fast backends.

Every public op validates its input here, before any kernel runs, and raises ValueError/TypeError
that names the argument and says what was expected. Nothing is silently broadcast.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, ndim: Optional[int] = None, shape: Optional[Sequence[Optional[int]]] = None,
           dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Check that x is a tensor of a float dtype with the given ndim / shape (None = any size).

    (Runs on every op call, including one-state real-time calls: the passing path does no more
    than the comparisons; messages are built only on failure.)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if shape is not None:
        xs = x.shape
        if len(xs) != len(shape) or any(s is not None and xs[i] != s for i, s in enumerate(shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            if len(xs) != len(shape):
                raise ValueError(f"{name} must be {want}, got shape {tuple(xs)}")
            raise ValueError(f"{name} must have shape {want}, got {tuple(xs)}")
    elif ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(x.shape)}")
    return x


def same_device(**tensors) -> torch.device:
    """All given tensors (None skipped) must be on one device; returns it."""
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {first} is on {dev}: all inputs must share a device")
    return dev


def same_dtype(**tensors) -> torch.dtype:
    dt = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dt is None:
            dt, first = t.dtype, name
        elif t.dtype != dt:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {dt}: inputs must share a dtype")
    return dt


def _capturing() -> bool:
    """True while a CUDA graph is being captured or torch.compile is tracing: value checks that
    need a device-to-host copy are skipped there (shape/dtype/device checks still run)."""
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # older torch
        pass
    # (no capture can run before CUDA is initialised: is_initialized() is a flag read, where
    # is_available() asks the driver, ~0.6 us on every op call)
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def finite(name: str, x: torch.Tensor) -> None:
    """Raise if x has NaN/inf. Skipped during CUDA-graph capture / compilation (it would sync)."""
    if _capturing():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; finite values are required")


def boolean(name: str, v) -> bool:
    """A real bool (not 0 / 1, not a string): TypeError naming ``name`` and the type it got."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


_INF = float("inf")


def positive_float(name: str, v, allow_zero: bool = False) -> float:
    """A finite float > 0 (>= 0 with ``allow_zero``), returned as float. Any real number converts (int,
    numpy or 0-d tensor values); a string or bool is refused like any other non-number (TypeError naming
    ``name``), not parsed: a config would otherwise keep ``"0.1"`` and fail later, far from the argument."""
    if type(v) is float and 0.0 < v < _INF:  # the common case, without the conversions below
        return v
    if isinstance(v, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None
    if not (f == f) or f in (float("inf"), float("-inf")) or f < 0 or (f == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {v!r}")
    return f


def choice(name: str, v, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")
    return v


def unit_interval(name: str, u: torch.Tensor) -> None:
    """Every element of u in [0, 1) (NaN fails). Skipped during CUDA-graph capture / compilation."""
    if _capturing():
        return
    if not bool(((u >= 0) & (u < 1)).all()):
        bad = u[~((u >= 0) & (u < 1))]
        raise ValueError(f"{name} must lie in [0, 1) with no NaN, got {bad.numel()} value(s) outside it "
                         f"(e.g. {float(bad[0])!r})")


def _first_float_param(module):
    """(owner submodule, name) of the first floating-point parameter, depth first in registration
    order, or None."""
    for name, p in module._parameters.items():
        if p is not None and p.is_floating_point():
            return module, name
    for m in module._modules.values():
        if m is not None:
            found = _first_float_param(m)
            if found is not None:
                return found
    return None


# id(module) -> (weakref(module), owner submodule, parameter name): where module_dtype last found the
# first float parameter. Entries leave with their module (weakref callback).
_FIRST_PARAM: dict = {}


def first_param(module) -> Optional[torch.Tensor]:
    """The first floating-point parameter of an nn.Module (in registration order, depth first); None
    when module is not an nn.Module or has no floating parameter.

    Runs on every sampler and policy call (one-state real-time calls too), so where that parameter
    lives is remembered per module and the parameter itself is read every call (``.to(dtype)``
    converts in place, ``owner._parameters[name]`` replaced is noticed). Only a parameter-owning
    submodule detached from the module since the last call (a replaced first layer) goes unseen
    until ``_FIRST_PARAM.pop(id(module))``; its parameter then speaks for the module."""
    rec = _FIRST_PARAM.get(id(module))
    if rec is not None and rec[0]() is module:
        p = rec[1]._parameters.get(rec[2])
        if p is not None:
            return p
    if not isinstance(module, torch.nn.Module):
        return None
    found = _first_float_param(module)
    if found is None:
        return None
    mid = id(module)
    _FIRST_PARAM[mid] = (weakref.ref(module, lambda _r, mid=mid: _FIRST_PARAM.pop(mid, None)),) + found
    return found[0]._parameters[found[1]]


def module_dtype(module) -> Optional[torch.dtype]:
    """The dtype of ``first_param(module)``; None when there is none."""
    p = first_param(module)
    return None if p is None else p.dtype


def module_inputs(module_name: str, module, **tensors) -> None:
    """Tensors fed to an nn.Module must have its parameters' dtype: a clear TypeError here instead
    of torch's 'mat1 and mat2 must have the same dtype' deep inside the reference (or a kernel).
    Modules without floating parameters and plain callables are not checked."""
    dt = module_dtype(module)
    if dt is None:
        return
    for name, t in tensors.items():
        if t is not None and t.dtype is not dt:
            raise TypeError(f"{name} has dtype {t.dtype} but {module_name}'s parameters are {dt}: cast the input "
                            f"({name}.to({dt})) or the module ({module_name}.to({t.dtype}))")


def sigma_limit(dtype: torch.dtype) -> float:
    """The largest noise level (sigma_max, sigma_data) the Karras scalings can use in ``dtype``.

    c_skip, c_out and c_in square sigma in the compute dtype (the reference computes them in the
    noise's dtype, the fused backends in float32): beyond sqrt(finfo.max) sigma^2 overflows, c_in
    and c_out become 0 and every action comes out 0 (or NaN). Half that (so sigma^2 +
    sigma_data^2 keeps a factor 4 of headroom): 9.2e18 in float32 / bfloat16, 128 in float16.
    Useful sigma_max values (CPQL / Karras: 80) are far below it."""
    return math.sqrt(torch.finfo(dtype).max) / 2.0


def candidate_q(q: torch.Tensor) -> None:
    """act's Q values of the candidates, [B, K]: a NaN / inf score cannot be ranked, so act must not
    pick a candidate silently (argmax would take the NaN, or the first index). Skipped during
    CUDA-graph capture / compilation (it would sync)."""
    if _capturing():
        return
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        nonfinite_q_states(bad.nonzero().flatten().tolist(), q.shape[0])


def nonfinite_q_states(states, B: int) -> None:
    """Raise act's error for the states (indices into B) whose candidates got a NaN / inf Q value
    (shared by the reference and the C++ backend, so the message is the same)."""
    if states:
        shown = ", ".join(str(s) for s in states[:8]) + (", ..." if len(states) > 8 else "")
        raise ValueError(f"critic returned NaN or inf Q values for the candidates of {len(states)} of {B} state(s) "
                         f"(states {shown}): act cannot rank them; check the critic's parameters and obs")


def nonempty_samples(name: str, x: torch.Tensor) -> None:
    """x [N, A] or [B, K, A] holds at least one sample per state (K >= 1) of at least one action
    dimension (A >= 1); N = B = 0 (an empty batch) is allowed and gives an empty result."""
    if x.shape[-1] == 0 or (x.dim() == 3 and x.shape[1] == 0):
        want = "[N, A] with A >= 1" if x.dim() == 2 else "[B, K, A] with K >= 1 and A >= 1"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
