"""The official CPQL and Diffusion-QL architectures and samplers, written for the tests from the papers
and the official code's semantics (no code downloaded): module layouts (so that their state_dicts have
the official keys) and eager sampling loops taking their noise as arguments.

Diffusion-QL (Wang et al. 2023): ``MLP`` (time_mlp, mid_layer, final_layer), ``Diffusion`` (schedule
buffers, p_sample_loop), ``Critic`` (q1_model / q2_model: Linear, Mish x3, Linear). CPQL (Chen et al.
2024): the same ``MLP``, ``KarrasDenoiser`` one-step / multistep sampling, ``Critic`` with LayerNorm
(offline) or Identity (online) after each hidden Linear, and a value head v_model.
"""
import math

import numpy as np
import torch
import torch.nn as nn


def official_betas(T, schedule):
    if schedule == "vp":
        t = np.arange(1, T + 1)
        alpha = np.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * t - 1) / T ** 2)
        return torch.tensor(1 - alpha, dtype=torch.float32)
    if schedule == "linear":
        return torch.tensor(np.linspace(1e-4, 2e-2, T), dtype=torch.float32)
    steps = T + 1
    x = np.linspace(0, steps, steps)
    ac = np.cos(((x / steps) + 0.008) / (1 + 0.008) * np.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.tensor(np.clip(1 - (ac[1:] / ac[:-1]), 0, 0.999), dtype=torch.float32)


class OfficialSinusoidal(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        f = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
        e = x[:, None] * f[None, :]
        return torch.cat((e.sin(), e.cos()), dim=-1)


class OfficialMLP(torch.nn.Module):
    """The layout of Diffusion-QL's / CPQL's agents/model.py MLP (time_mlp, mid_layer, final_layer)."""

    def __init__(self, state_dim, action_dim, t_dim=16, hidden=256):
        super().__init__()
        self.time_mlp = torch.nn.Sequential(OfficialSinusoidal(t_dim), torch.nn.Linear(t_dim, 2 * t_dim),
                                            torch.nn.Mish(), torch.nn.Linear(2 * t_dim, t_dim))
        self.mid_layer = torch.nn.Sequential(
            torch.nn.Linear(state_dim + action_dim + t_dim, hidden), torch.nn.Mish(),
            torch.nn.Linear(hidden, hidden), torch.nn.Mish(), torch.nn.Linear(hidden, hidden), torch.nn.Mish())
        self.final_layer = torch.nn.Linear(hidden, action_dim)

    def forward(self, x, time, state):
        return self.final_layer(self.mid_layer(torch.cat([x, self.time_mlp(time), state], dim=1)))


class OfficialDiffusion(torch.nn.Module):
    """The buffers and sampling loop of Diffusion-QL's Diffusion, noise given instead of drawn."""

    def __init__(self, model, T=5, schedule="vp", max_action=1.0, predict_epsilon=True):
        super().__init__()
        self.model, self.T, self.max_action, self.predict_epsilon = model, T, max_action, predict_epsilon
        betas = official_betas(T, schedule)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, axis=0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        self.register_buffer("betas", betas)
        self.register_buffer("alphas_cumprod", ac)
        self.register_buffer("alphas_cumprod_prev", ac_prev)
        self.register_buffer("sqrt_alphas_cumprod", torch.sqrt(ac))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - ac))
        self.register_buffer("log_one_minus_alphas_cumprod", torch.log(1.0 - ac))
        self.register_buffer("sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / ac))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / ac - 1))
        var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.register_buffer("posterior_variance", var)
        self.register_buffer("posterior_log_variance_clipped", torch.log(torch.clamp(var, min=1e-20)))
        self.register_buffer("posterior_mean_coef1", betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.register_buffer("posterior_mean_coef2", (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))

    def sample(self, state, x, noises):
        b = x.shape[0]
        for k, i in enumerate(reversed(range(self.T))):
            t = torch.full((b,), i, dtype=torch.long)
            out = self.model(x, t, state)
            if self.predict_epsilon:
                x_recon = self.sqrt_recip_alphas_cumprod.gather(-1, t)[:, None] * x - \
                    self.sqrt_recipm1_alphas_cumprod.gather(-1, t)[:, None] * out
            else:
                x_recon = out
            x_recon = x_recon.clamp(-self.max_action, self.max_action)
            mean = self.posterior_mean_coef1.gather(-1, t)[:, None] * x_recon + \
                self.posterior_mean_coef2.gather(-1, t)[:, None] * x
            logvar = self.posterior_log_variance_clipped.gather(-1, t)[:, None]
            nonzero = (1 - (t == 0).float()).reshape(b, 1)
            z = noises[k] if k < len(noises) else torch.zeros_like(x)
            x = mean + nonzero * (0.5 * logvar).exp() * z
        return x.clamp(-self.max_action, self.max_action)


class OfficialCritic(nn.Module):
    """CPQL's (norm = "layernorm" offline, "identity" online, with v_model) or Diffusion-QL's (norm = None) Critic."""

    def __init__(self, S, A, H=256, norm=None):
        super().__init__()

        def head():
            mods = []
            d = S + A
            for _ in range(3):
                mods.append(nn.Linear(d, H))
                if norm == "layernorm":
                    mods.append(nn.LayerNorm(H))
                elif norm == "identity":
                    mods.append(nn.Identity())
                mods.append(nn.Mish())
                d = H
            mods.append(nn.Linear(H, 1))
            return nn.Sequential(*mods)

        self.q1_model, self.q2_model = head(), head()
        if norm is not None:  # CPQL's value head (IQL), not part of the twin Q
            self.v_model = nn.Sequential(nn.Linear(S, H), nn.Mish(), nn.Linear(H, H), nn.Mish(), nn.Linear(H, H),
                                         nn.Mish(), nn.Linear(H, 1))

    def forward(self, state, action):
        x = torch.cat([state, action], dim=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, state, action):
        q1, q2 = self.forward(state, action)
        return torch.min(q1, q2)


def karras_official_sample(model, state, x_T, noises, ts=None, sigma_max=80.0, sigma_min=0.002, sigma_data=0.5,
                           rho=7.0, steps=40):
    """CPQL's KarrasDenoiser.sample: one step from sigma_max (ts None) or multistep over ts, noise given
    (x_T ~ N(0, I) unscaled; noises[i] the re-noise draw of step i). Clamped to [-1, 1]."""
    def denoise(x, sigma):
        c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
        c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5
        c_skip, c_out, c_in = (c[:, None] for c in (c_skip, c_out, c_in))
        out = model(c_in * x, 1000 * 0.25 * torch.log(sigma + 1e-44), state)
        return (c_out * out + c_skip * x).clamp(-1, 1)

    i = torch.arange(steps, dtype=torch.float64)
    sigmas = ((sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho)
    sigmas = sigmas.float()
    x = x_T * sigma_max
    s_in = x.new_ones([x.shape[0]])
    x = denoise(x, sigmas[0] * s_in)
    for k, idx in enumerate(ts or ()):
        t = (sigma_max ** (1 / rho) + idx / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        t = float(np.clip(t, sigma_min, sigma_max))
        x = x + noises[k] * np.sqrt(t ** 2 - sigma_min ** 2)
        x = denoise(x, t * s_in)
    return x.clamp(-1, 1)

