"""The dispatch registry: choose() with its cached plans, supports vs fast_supports, errors."""
import pytest
import torch

from qipo_kernels import backends as B


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that the dummy op never leaks into other tests. Every backend
    module registers itself first: one imported into the copy would be missing from the real registry
    (and never imported again) after the test."""
    for backend in B._MODULES:
        B._load(backend)
    for name in ("_IMPLS", "_REG", "_PLANS"):
        monkeypatch.setattr(B, name, {k: (dict(v) if isinstance(v, dict) else v) for k, v in getattr(B, name).items()})
    return B


def test_choose_uses_fast_supports_and_reasons_the_full_one(registry):
    seen = []

    def impl(x):
        return "cpp-impl"

    def supports(x=None, **_):
        seen.append("full")
        return ["full check says no"] if x == "bad-full" else []

    def fast(x=None, **_):
        seen.append("fast")
        return ["fast check says no"] if x == "bad" else []

    registry.register("dummy", "cpp", impl, supports, fast)
    cpu = torch.device("cpu")
    if registry.backend_reasons("cpp", cpu):
        pytest.skip("the C++ extension is not available here: " + "; ".join(registry.backend_reasons("cpp", cpu)))
    ref = object()
    assert registry.choose("dummy", "auto", cpu, ref, x="ok") == ("cpp", impl)
    assert seen == ["fast"]
    assert ("dummy", "auto", cpu) in registry._PLANS                   # planned once, then looked up
    assert registry.choose("dummy", "auto", cpu, ref, x="bad") == ("torch", ref)  # auto falls back
    with pytest.raises(RuntimeError, match="fast check says no"):
        registry.choose("dummy", "cpp", cpu, ref, x="bad")             # a named backend raises
    assert registry.choose("dummy", "torch", cpu, ref, x="bad") == ("torch", ref)
    seen.clear()
    assert registry.reasons("dummy", "cpp", cpu, x="bad-full") == ["full check says no"]
    assert seen == ["full"]                                             # diagnostics run the full check
    assert registry.explain("dummy", cpu, x="ok")["cpp"] == []
    # register() drops the plans (a backend registered later must be seen)
    registry.register("dummy", "cpp", impl, supports)
    assert not registry._PLANS


def test_choose_errors_and_devices(registry, monkeypatch):
    ref = object()
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.choose("integrate", "cuda", torch.device("cpu"), ref)
    assert registry.choose("integrate", "auto", None, ref) == ("torch", ref)     # no device: the reference
    assert registry.choose("integrate", "auto", torch.device("meta"), ref) == ("torch", ref)
    with pytest.raises(RuntimeError, match="cannot run integrate"):
        registry.choose("integrate", "cpp", torch.device("meta"), ref)
    with pytest.raises(RuntimeError, match="no cpp implementation of flow_path|failed to import"):
        registry.choose("flow_path", "cpp", torch.device("cpu"), ref)
    # Triton off CUDA depends on TRITON_INTERPRET: a cached plan carries the value it was made under,
    # and choose re-plans when it changed
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registry.register("dummy_t", "triton", lambda: "impl")
    if registry.backend_reasons("triton", torch.device("cpu")):
        return  # triton does not import here
    assert registry.choose("dummy_t", "auto", torch.device("cpu"), ref) == ("torch", ref)  # never chosen by auto
    assert registry.choose("dummy_t", "triton", torch.device("cpu"), ref)[0] == "triton"
    assert registry._PLANS[("dummy_t", "triton", torch.device("cpu"))].interpret is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        registry.choose("dummy_t", "triton", torch.device("cpu"), ref)


def test_fallback_is_a_runtime_error():
    assert issubclass(B.Fallback, RuntimeError)
    try:
        from qipo_kernels import cpp
    except ImportError:
        return
    assert issubclass(cpp.Unsupported, B.Fallback)


def test_refresh_without_packs_is_harmless():
    import qipo_kernels as qk

    qk.refresh()
    qk.refresh(torch.nn.Linear(2, 2))


def test_backends_does_not_import_ops():
    """No import circle: ops imports backends (and takes the op list from it), never the reverse."""
    import ast
    import inspect

    from qipo_kernels import backends as B
    from qipo_kernels import ops

    tree = ast.parse(inspect.getsource(B))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {a.name for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not {"ops", "qipo_kernels.ops"} & imported, imported
    # every dispatched op is a public function of ops, but act_ext: act's entry for DDPM actors and
    # non-default consistency sigmas, reached through ops.act
    assert ops.OPS == B.OPS and all(callable(getattr(ops, name)) for name in B.OPS if name != "act_ext")
    assert callable(ops._act_ext_ref)
