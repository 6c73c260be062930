"""Argument checks shared by the references and the fast backends.

Every public op validates its input here, before any kernel runs, and raises ValueError/TypeError
that names the argument and says what was expected. Nothing is silently broadcast.
"""
from __future__ import annotations

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
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


def finite(name: str, x: torch.Tensor) -> None:
    """Raise if x has NaN/inf. Skipped during CUDA-graph capture / compilation (it would sync)."""
    if _capturing():
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; finite values are required")


def positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


_INF = float("inf")


def positive_float(name: str, v, allow_zero: bool = False) -> float:
    if type(v) is float and 0.0 < v < _INF:  # the common case, without the conversions below
        return v
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
