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
