"""Test configuration.

TRITON_INTERPRET is read when @triton.jit runs, i.e. at import of the kernels: it is set here,
before qipo_kernels is imported, so that the Triton kernels run on the CPU interpreter when there
is no GPU. Outputs of fast kernels are poisoned with NaN by the tests (see ``poison``), so an
element a kernel leaves unwritten fails the comparison.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (atol, rtol) of a float32/float64 computation against the float64 truth, by dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need_backend(backend: str) -> None:
    """Skip the calling test when ``backend`` cannot run on the CPU here ("torch" and "auto" always can)."""
    if backend in ("torch", "auto"):
        return
    from qipo_kernels import backends

    why = backends.backend_reasons(backend, torch.device("cpu"))
    if why:
        pytest.skip(f"{backend} unavailable here: " + "; ".join(why))


def tiny_qipo_config(**overrides):
    """A QIPOConfig small enough for a unit test (hidden 16, a few steps per stage, no evaluation, no
    TensorBoard); ``overrides`` replace any field (test_algos, test_qipo_stage3)."""
    from qipo_kernels.algos.qipo import QIPOConfig

    c = dict(hidden=16, depth=2, critic_hidden=16, critic_depth=2, pretrain_steps=12, pretrain_batch=32, q_steps=12,
             q_batch=32, q_support=3, q_support_refresh=5, policy_steps=12, policy_batch=16, num_support=4,
             renew_every=5, renew_chunk=64, sample_steps=2, eval_episodes=0, log_every=4, checkpoint_every=5,
             tensorboard=False)
    c.update(overrides)
    return QIPOConfig(**c)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def _nan_tensor(shape, dtype, device):
    """A Triton launcher's output allocation (triton._host.empty), filled with NaN (-7 for integers)."""
    return torch.full(tuple(shape), float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


def _nan_array(shape, dtype=None):
    """The C++ backend's output allocation (cpp._empty), filled with NaN (-7 for integers)."""
    import numpy as np

    a = np.empty(shape, dtype=np.float32 if dtype is None else dtype)
    a.fill(np.nan if a.dtype.kind == "f" else -7)
    return a


def poison_triton(monkeypatch) -> None:
    """Every buffer a Triton launcher hands to a kernel starts as NaN, so an element the kernel leaves
    unwritten fails the comparison."""
    from qipo_kernels.triton import _host

    monkeypatch.setattr(_host, "empty", _nan_tensor)


def poison_cpp(monkeypatch) -> None:
    """Every output buffer the C++ backend writes starts as NaN (-7 for integers)."""
    from qipo_kernels import cpp

    monkeypatch.setattr(cpp, "_empty", _nan_array)


def poison_fast_outputs(monkeypatch) -> None:
    """poison_cpp and poison_triton, each where that backend runs here."""
    from qipo_kernels import backends

    if not backends.backend_reasons("cpp", torch.device("cpu")):
        poison_cpp(monkeypatch)
    if not backends.backend_reasons("triton", torch.device("cpu")):
        poison_triton(monkeypatch)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Triton outputs poisoned with NaN (poison_triton) and the test run under torch.no_grad(): the
    fused samplers' test modules use it on every test (``pytestmark =
    pytest.mark.usefixtures("poisoned_buffers")``)."""
    poison_triton(monkeypatch)
    with torch.no_grad():
        yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Small nets on a shared 2-core machine run faster (and steadier) on one torch thread.
    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RL_MODULES = ("minari", "gymnasium", "h5py")


def require_rl():
    """Skip the calling test, saying why, unless the 'rl' extra (minari, gymnasium, h5py) imports: the
    'test' extra alone (`pip install -e ".[test]"`) runs everything else."""
    import importlib

    for m in RL_MODULES:
        try:
            importlib.import_module(m)
        except ImportError as e:
            pytest.skip(f"needs {m} (the 'rl' extra: pip install -e '.[rl]'): {e}")


@pytest.fixture(scope="module")
def demo_minari_root(tmp_path_factory):
    """A private $MINARI_DATASETS_PATH holding the embedded demo dataset (made once per session,
    the variable set for the whole module that asks for it). Skips without the 'rl' extra."""
    require_rl()
    from qipo_kernels import data

    root = str(tmp_path_factory.getbasetemp() / "minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", root)
        data.make_local_dataset()
        yield root


def make_demo_root(tmp_path_factory, name: str, num_episodes: int):
    """A fresh datasets directory holding a small embedded demo dataset (num_episodes episodes)."""
    require_rl()
    from qipo_kernels.data import DEMO_DATASET_ID, make_local_dataset

    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        make_local_dataset(DEMO_DATASET_ID, num_episodes=num_episodes, seed=0)
    return root
