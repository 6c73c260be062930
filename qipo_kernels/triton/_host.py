"""Host-side helpers shared by the loss and selection kernels (no kernels here).

* ``empty``: every output a launcher hands to a kernel is allocated through this module-level
  function, so tests can monkeypatch it to ``torch.full(..., nan)`` and catch an element a kernel
  leaves unwritten.
* ``device_guard``: Triton launches on the *current* CUDA device; make it the tensors' device.
* ``dtype_reasons``: which dtypes a Triton kernel takes here (the CPU interpreter runs float32
  and float64 only; bfloat16/float16 need a GPU).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

# Inputs whose last dim is wider than this are left to the reference (one tile holds a whole row).
MAX_D = 1024


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace this with a NaN-filled allocation)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_reasons(name: str, x: Optional[torch.Tensor], allowed=_GPU_DTYPES) -> List[str]:
    """Reasons why tensor ``x`` (argument ``name``) cannot go to a Triton kernel, by dtype."""
    if x is None or not torch.is_tensor(x):
        return []
    if x.dtype not in allowed:
        return [f"{name} has dtype {x.dtype}; the Triton kernel takes {[str(d) for d in allowed]}"]
    if x.device.type != "cuda" and x.dtype in (torch.float16, torch.bfloat16):
        return [f"{name} has dtype {x.dtype}; the Triton CPU interpreter runs float32 only (16-bit needs a GPU)"]
    return []


def grad_wanted(*xs) -> bool:
    """True if autograd will want a gradient for any of the given tensors (None skipped)."""
    if not torch.is_grad_enabled():
        return False
    return any(x is not None and torch.is_tensor(x) and x.requires_grad for x in xs)
