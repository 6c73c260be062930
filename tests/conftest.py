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


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


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
