"""qipo_kernels: fused kernels for flow-matching (QIPO) and consistency (CPQL) policies.

Time convention: noise at t = 0, data (actions) at t = 1 for flows; noise level sigma for
consistency models. Shapes: pred/target [B, M, D], energy [B, M], obs [B, S], candidates [B, K, D].
"""
from . import backends, nets, ops, reference
from .backends import refresh
from .nets import ConditionalMLP, DoubleCritic
from .ops import (
    act, consistency_denoise, consistency_loss, consistency_sample, ddpm_sample, flow_matching_loss, flow_path, integrate,
    karras_sigmas, sample, select_action, weighted_fm_loss,
)
from .policies import ConsistencyPolicy, DDPMPolicy, FlowPolicy, Sampler, make_sampler

__version__ = "0.1.0"

__all__ = [
    "backends", "nets", "ops", "reference", "ConditionalMLP", "DoubleCritic", "act", "consistency_denoise",
    "consistency_loss", "consistency_sample", "ddpm_sample", "flow_matching_loss", "flow_path", "integrate", "karras_sigmas",
    "sample", "select_action", "weighted_fm_loss", "refresh", "FlowPolicy", "ConsistencyPolicy", "DDPMPolicy", "Sampler", "make_sampler",
    "__version__",
]
