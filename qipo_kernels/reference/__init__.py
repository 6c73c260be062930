"""Plain-PyTorch reference implementations of every op: the specification the fast backends match.

All are autograd-capable, run on any device, and accept float32 and float64 (float16/bfloat16 too,
computed in that precision). Each validates its arguments like the dispatched op in qipo_kernels.ops.
"""
from .consistency import (
    SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, RHO, NUM_SCALES, consistency_denoise, consistency_loss,
    consistency_sample, cpql_multistep_sigmas, karras_sigmas, scalings, time_input,
)
from .ddpm import DDPMSchedule, SCHEDULES, beta_schedule, ddpm_sample
from .loss import NORMALIZE, dequantize_bounds, draw_weighted_pairs, energy_weights, flow_matching_loss, weighted_fm_loss
from .ode import NOISE_SOLVERS, SOLVERS, STAGES, VELOCITY_SOLVERS, integrate, sample
from .paths import PATHS, alpha_sigma, flow_path, inverse_log_snr, log_snr
from .select import SELECT_MODES, select_action, select_index

__all__ = [
    "SIGMA_DATA", "SIGMA_MAX", "SIGMA_MIN", "RHO", "NUM_SCALES", "consistency_denoise", "consistency_loss",
    "consistency_sample", "cpql_multistep_sigmas", "karras_sigmas", "DDPMSchedule", "SCHEDULES", "beta_schedule", "ddpm_sample", "scalings", "time_input", "NORMALIZE", "dequantize_bounds", "draw_weighted_pairs", "energy_weights",
    "flow_matching_loss", "weighted_fm_loss", "NOISE_SOLVERS", "SOLVERS", "STAGES", "VELOCITY_SOLVERS",
    "integrate", "sample", "PATHS", "alpha_sigma", "flow_path", "inverse_log_snr", "log_snr", "SELECT_MODES",
    "select_action", "select_index",
]
