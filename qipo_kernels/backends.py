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
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("triton", "cpp", "torch")
# The functional ops of qipo_kernels.ops (named here so that this module never imports ops: ops
# imports backends, not the other way round).
OPS = ("flow_path", "weighted_fm_loss", "flow_matching_loss", "integrate", "sample", "consistency_sample",
       "ddpm_sample", "select_action", "act", "act_ext")
# backend -> module that registers its implementations when imported
_MODULES = {"triton": "qipo_kernels.triton", "cpp": "qipo_kernels.cpp"}
_IMPLS: Dict[str, Dict[str, Callable]] = {}
# (op, backend) -> (impl, supports, fast_supports): supports (or None) answers reasons / explain,
# fast_supports (supports when none was given) is what dispatch asks on every call
_Supports = Optional[Callable[..., List[str]]]
_REG: Dict[Tuple[str, str], Tuple[Callable, _Supports, _Supports]] = {}
# (op, backend asked for, device) -> the backends to try, [(name, impl, supports)], whose
# op-independent reasons are known to be empty for good (see choose); cleared by register().
_PLANS: Dict[tuple, list] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_LOADED: Dict[str, bool] = {}


class Fallback(RuntimeError):
    """Raised by an implementation that ``supports`` (or ``fast_supports``) let through but that
    found, running, that it cannot do this call after all (e.g. the C++ backend sees that a
    module's parameters became float64 since its last call). The ops layer then runs the reference
    for backend="auto", or raises RuntimeError with the message for a named backend."""


def register(op: str, backend: str, impl: Callable, supports: Optional[Callable[..., List[str]]] = None,
             fast_supports: Optional[Callable[..., List[str]]] = None) -> None:
    """Register ``impl`` as ``backend``'s implementation of ``op``.

    ``supports(**call_args)`` returns the reasons this backend cannot run a particular call
    (e.g. a hidden width over 512); an empty list means it can. ``fast_supports`` (default:
    ``supports``) is what dispatch asks on every call; it may leave a check to the impl, which then
    raises Fallback when that check fails.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = impl
    _REG[(op, backend)] = (impl, supports, fast_supports or supports)
    _PLANS.clear()


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


def _device_type(device) -> Optional[str]:
    if device is None:
        return None
    return device.type if isinstance(device, torch.device) else torch.device(device).type


# (backend, device type) pairs known to have no op-independent reasons; filled by backend_reasons.
# Only answers that cannot change later are kept: an import is tried once, and a device type
# either is supported or not (triton off CUDA depends on TRITON_INTERPRET, so it is never kept).
_READY: set = set()


def backend_reasons(backend: str, device: Optional[torch.device] = None) -> List[str]:
    """Reasons (op-independent) why ``backend`` cannot run on ``device`` here; [] if it can."""
    return _backend_reasons(backend, _device_type(device))


def _backend_reasons(backend: str, dt: Optional[str]) -> List[str]:
    if backend == "torch":
        return []
    if (backend, dt) in _READY:
        return []
    _load(backend)
    out = []
    if backend in _IMPORT_ERRORS:
        out.append(f"{_MODULES[backend]} failed to import ({_IMPORT_ERRORS[backend]})")
    if dt is not None:
        if backend == "triton" and dt != "cuda" and not interpret_mode():
            out.append(f"inputs are on {dt}; Triton kernels need a CUDA device "
                       "(or TRITON_INTERPRET=1 set before import for the CPU interpreter)")
        if backend == "cpp" and dt != "cpu":
            out.append(f"inputs are on {dt}; the C++ backend runs on CPU tensors only")
    if not out and dt is not None and not (backend == "triton" and dt != "cuda"):
        _READY.add((backend, dt))
    return out


def _call_reasons(op: str, backend: str, dt: Optional[str], call_args: dict) -> List[str]:
    out = _backend_reasons(backend, dt)
    if out:
        return out
    if backend == "torch":
        return []
    reg = _REG.get((op, backend))
    if reg is None:
        return [f"no {backend} implementation of {op}"]
    return reg[1](**call_args) if reg[1] is not None else []


def reasons(op: str, backend: str, device: Optional[torch.device] = None, **call_args) -> List[str]:
    """Why ``backend`` cannot run this call of ``op``; [] if it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    return _call_reasons(op, backend, _device_type(device), call_args)


_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def auto_order(device: Optional[torch.device]) -> Tuple[str, ...]:
    """Preference for backend="auto": Triton on CUDA, C++ on CPU, the reference last.

    Triton under the CPU interpreter is for testing only and is never chosen automatically.
    """
    return _AUTO_ORDER.get(_device_type(device), ("torch",))


def choose(op: str, backend: str, device: Optional[torch.device], reference: Callable, **call_args) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for this call: (backend name, callable).

    backend="auto" tries the auto_order of the device, first backend with no reasons wins;
    a named backend with reasons raises RuntimeError listing them. This runs on every op call
    (one-state real-time calls included), so the answer that does not depend on the call's
    arguments (which backends are loaded and run on this device) is planned once per
    (op, backend, device); only each candidate's ``supports(**call_args)`` runs per call.
    """
    plan = _PLANS.get((op, backend, device))
    if plan is None:
        plan = _plan(op, backend, device)
    elif plan.__class__ is _InterpretPlan and plan.interpret != interpret_mode():
        plan = _plan(op, backend, device)
    for name, impl, sup in plan:
        if name == "torch":
            return "torch", reference
        if sup is None:
            return name, impl
        why = sup(**call_args)
        if not why:
            return name, impl
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r} cannot run {op} here: " + "; ".join(why))
    return "torch", reference


class _InterpretPlan(list):
    """A plan that involves Triton off CUDA: valid while TRITON_INTERPRET keeps the value it had."""
    interpret = False


def _plan(op: str, backend: str, device) -> list:
    """The candidate list for choose; cached per (op, backend, device), and for Triton off CUDA
    together with the TRITON_INTERPRET value it was made under (choose re-plans when that changed).
    A named backend that cannot run here raises."""
    dt = _device_type(device)
    cache = dt is not None
    interp = False
    if backend == "auto":
        names = _AUTO_ORDER.get(dt, ("torch",))
    elif backend in BACKENDS:
        names = (backend,)
    else:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    plan = []
    for b in names:
        if b == "triton" and dt != "cuda":
            interp = True
        if b == "torch":
            plan.append(("torch", None, None))
            continue
        why = _backend_reasons(b, dt)
        reg = _REG.get((op, b))
        if not why and reg is None:
            why = [f"no {b} implementation of {op}"]
        if why:
            if backend != "auto":
                raise RuntimeError(f"backend={backend!r} cannot run {op} here: " + "; ".join(why))
            continue
        plan.append((b, reg[0], reg[2]))
    if interp:
        plan = _InterpretPlan(plan)
        plan.interpret = interpret_mode()
    if cache:
        _PLANS[(op, backend, device)] = plan
    return plan


def refresh(module=None) -> None:
    """Drop the packed weights that loaded backends keep for ``module`` (every module when None);
    the next call re-packs. The C++ and Triton backends keep packs and re-pack by themselves after
    any change but one: an edit through ``p.data`` that no version counter records (see
    qipo_kernels.cpp.refresh, qipo_kernels.triton.refresh)."""
    for b in _MODULES:
        mod = sys.modules.get(_MODULES[b])  # every backend imported so far (by dispatch or directly)
        fn = getattr(mod, "refresh", None)
        if fn is not None:
            fn(module)


def explain(op: str, device: Optional[torch.device] = None, **call_args) -> Dict[str, List[str]]:
    """{backend: reasons} for one op and device (empty list = usable)."""
    return {b: reasons(op, b, device, **call_args) for b in BACKENDS}


def table() -> str:
    """A text table: each backend and op, on each device kind present, with the reasons."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
    for b in BACKENDS:
        for d in devices:
            r = backend_reasons(b, torch.device(d))
            if r:
                lines.append(f"  {b:7s} on {d:4s}: unavailable - {'; '.join(r)}")
            else:
                ops_here = sorted(o for o in OPS if b == "torch" or b in _IMPLS.get(o, {}))
                lines.append(f"  {b:7s} on {d:4s}: available for {', '.join(ops_here)}")
    return "\n".join(lines)


if __name__ == "__main__":
    # Run as a script this file is a second module (__main__) whose registry stays empty: the backends
    # register into qipo_kernels.backends, so print that module's table.
    from qipo_kernels import backends as _registry

    print(_registry.table())
