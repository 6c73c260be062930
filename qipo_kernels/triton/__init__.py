"""Triton backend: importing this package registers the fused kernels with qipo_kernels.backends.

The kernels are plain @triton.jit functions (autotuned variants are created lazily on first CUDA
use), so this package imports on machines without a GPU; there they run only under
TRITON_INTERPRET=1 (set before import), in float32.
"""
from . import sampler  # noqa: F401  (registers integrate, consistency_sample, act)
