"""Which backends exist here, and why the others don't.

Every op in qipo_kernels.ops has a ``backend`` argument: "auto", "torch" (the plain-PyTorch
reference), "triton" (fused GPU kernels; on a CPU they run only under TRITON_INTERPRET=1) or "cpp"
(the qipo_kernels._C CPU extension). A backend module registers its implementations with
``register``; ``reasons`` says why a backend cannot run a given call; ``choose`` takes the first
backend with no reasons ("auto") or raises an error listing the reasons of the one asked for.

    qipo-kernels backends                  # prints this machine's table (also: backends.table())
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("triton", "cpp", "torch")
# backend -> module that registers its implementations when imported
_MODULES = {"triton": "qipo_kernels.triton", "cpp": "qipo_kernels.cpp"}
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_SUPPORTS: Dict[Tuple[str, str], Callable[..., List[str]]] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_LOADED: Dict[str, bool] = {}


def register(op: str, backend: str, impl: Callable, supports: Optional[Callable[..., List[str]]] = None) -> None:
    """Register ``impl`` as ``backend``'s implementation of ``op``.

    ``supports(**call_args)`` returns the reasons this backend cannot run a particular call
    (e.g. a hidden width over 512); an empty list means it can.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = impl
    if supports is not None:
        _SUPPORTS[(op, backend)] = supports


# Run eagerly even while torch.compile traces a caller: Dynamo refuses to trace importlib, so the
# first dispatch of a compiled function would otherwise break the graph (fullgraph=True fails).
@torch.compiler.assume_constant_result
def _load(backend: str) -> None:
    if backend in _LOADED or backend not in _MODULES:
        return
    _LOADED[backend] = True
    try:
        importlib.import_module(_MODULES[backend])
    except Exception as e:  # an optional backend must never break the package
        _IMPORT_ERRORS[backend] = f"{type(e).__name__}: {e}"


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_reasons(backend: str, device: Optional[torch.device] = None) -> List[str]:
    """Reasons (op-independent) why ``backend`` cannot run on ``device`` here; [] if it can."""
    if backend == "torch":
        return []
    _load(backend)
    out = []
    if backend in _IMPORT_ERRORS:
        out.append(f"{_MODULES[backend]} failed to import ({_IMPORT_ERRORS[backend]})")
    if device is not None:
        dev = torch.device(device)
        if backend == "triton" and dev.type != "cuda" and not interpret_mode():
            out.append(f"inputs are on {dev.type}; Triton kernels need a CUDA device "
                       "(or TRITON_INTERPRET=1 set before import for the CPU interpreter)")
        if backend == "cpp" and dev.type != "cpu":
            out.append(f"inputs are on {dev.type}; the C++ backend runs on CPU tensors only")
    return out


def reasons(op: str, backend: str, device: Optional[torch.device] = None, **call_args) -> List[str]:
    """Why ``backend`` cannot run this call of ``op``; [] if it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    out = backend_reasons(backend, device)
    if out:
        return out
    if backend != "torch" and backend not in _IMPLS.get(op, {}):
        return [f"no {backend} implementation of {op}"]
    sup = _SUPPORTS.get((op, backend))
    if sup is not None:
        out.extend(sup(**call_args))
    return out


def auto_order(device: Optional[torch.device]) -> Tuple[str, ...]:
    """Preference for backend="auto": Triton on CUDA, C++ on CPU, the reference last.

    Triton under the CPU interpreter is for testing only and is never chosen automatically.
    """
    if device is not None and torch.device(device).type == "cuda":
        return ("triton", "torch")
    if device is not None and torch.device(device).type == "cpu":
        return ("cpp", "torch")
    return ("torch",)


def choose(op: str, backend: str, device: Optional[torch.device], reference: Callable, **call_args) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for this call: (backend name, callable)."""
    if backend == "auto":
        for b in auto_order(device):
            if b == "torch":
                return "torch", reference
            if not reasons(op, b, device, **call_args):
                return b, _IMPLS[op][b]
        return "torch", reference
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "torch":
        return "torch", reference
    why = reasons(op, backend, device, **call_args)
    if why:
        raise RuntimeError(f"backend={backend!r} cannot run {op} here: " + "; ".join(why))
    return backend, _IMPLS[op][backend]


def explain(op: str, device: Optional[torch.device] = None, **call_args) -> Dict[str, List[str]]:
    """{backend: reasons} for one op and device (empty list = usable)."""
    return {b: reasons(op, b, device, **call_args) for b in BACKENDS}


def table() -> str:
    """A text table: each backend and op, on each device kind present, with the reasons."""
    from . import ops  # noqa: F401  (ops names the op list)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for b in BACKENDS:
        for d in devices:
            r = backend_reasons(b, torch.device(d))
            if r:
                lines.append(f"  {b:7s} on {d:4s}: unavailable - {'; '.join(r)}")
            else:
                ops_here = sorted(o for o in ops.OPS if b == "torch" or b in _IMPLS.get(o, {}))
                lines.append(f"  {b:7s} on {d:4s}: available for {', '.join(ops_here)}")
    return "\n".join(lines)


if __name__ == "__main__":
    # Run as a script this file is a second module (__main__) whose registry stays empty: the backends
    # register into qipo_kernels.backends, so print that module's table.
    from qipo_kernels import backends as _registry

    print(_registry.table())
