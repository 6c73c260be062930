"""Triton backend: importing this package registers the fused kernels with qipo_kernels.backends.

Imported lazily by backends._load: if triton is missing or broken, the import error is recorded as
the reason the backend is unavailable and qipo_kernels itself still imports. The kernels are plain
@triton.jit functions (autotuned variants are created lazily on first CUDA use), so this package
imports on machines without a GPU; there they run only under TRITON_INTERPRET=1 (set before
import), in float32.
"""
from . import loss, select  # noqa: F401  (flow_matching_loss, weighted_fm_loss, flow_path, select_action)
from . import sampler  # noqa: F401  (integrate, consistency_sample, act, sample)
from .sampler_pack import refresh  # noqa: F401  (backends.refresh drops the packed weights)
