"""What the fused Triton samplers can run: the reasons a call cannot (``supports_*``, for
backends.reasons / explain) and the checks dispatch asks on every call (``_fast_*``: the common case
answered in one expression, a current pack answering for the parameters).

The implementations and their registration with qipo_kernels.backends are in sampler.py.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..nets import ConditionalMLP, DoubleCritic
from .mlp import ACT_CODES
from .sampler_launch import act_candidates_reason, interpret
from .sampler_pack import _PACKS

MAX_HIDDEN = 512
MAX_DEPTH = 6
MAX_ACT_DIM = 64
MAX_CANDIDATES = 256


# ----------------------------------------------------------------------------------------------
# supports(): reasons a call cannot run here
# ----------------------------------------------------------------------------------------------
def _dtype_reasons(name, t) -> List[str]:
    if t.__class__ is torch.Tensor and t.dtype is torch.float32:  # (the common case, answered first)
        return []
    if t is None or not torch.is_tensor(t):
        return []
    if t.dtype == torch.float64:
        return [f"{name} is float64: the Triton kernels compute in float32/bfloat16/float16 (use backend='torch')"]
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return [f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"]
    if t.dtype != torch.float32 and (interpret() or t.device.type != "cuda"):
        return [f"{name} is {t.dtype}: the Triton CPU interpreter computes float32 only (bf16/fp16 need a GPU)"]
    return []


def _module_reasons(name, m, dtype, device, fast=False) -> List[str]:
    if fast and not torch.compiler.is_compiling():
        # dispatch (fast_supports): a pack for (dtype, device) made from parameters already like that
        # answers without walking the module; whether it is still current is the impl's get_pack
        # check, which raises backends.Fallback if the parameters are no longer like that
        ents = _PACKS.get(m)
        e = ents.get((dtype, device)) if ents is not None else None
        if e is not None and e.ok:
            return []
    out = []
    ps = list(m.parameters())
    if any(p.dtype != dtype for p in ps):
        out.append(f"{name}'s parameters are {ps[0].dtype} but the inputs are {dtype}")
    if device is not None and any(p.device != device for p in ps):
        out.append(f"{name}'s parameters are on {ps[0].device} but the inputs are on {device}")
    return out


def _grad_reasons(name, m, *tensors) -> List[str]:
    if not torch.is_grad_enabled():
        return []
    if any(t is not None and torch.is_tensor(t) and t.requires_grad for t in tensors) or \
            any(p.requires_grad for p in m.parameters()):
        return [f"gradients are enabled and {name} or the inputs require grad: the fused sampler has no backward "
                "(call it under torch.no_grad() / torch.inference_mode(), or use backend='torch')"]
    return []


def _net_reasons(net) -> List[str]:
    if not isinstance(net, ConditionalMLP) or type(net).forward is not ConditionalMLP.forward \
            or type(net).embed_time is not ConditionalMLP.embed_time:
        return [f"net is a {type(net).__name__}, not a qipo_kernels.nets.ConditionalMLP (the fused kernel implements "
                "exactly that architecture)"]
    out = []
    if net.hidden > MAX_HIDDEN:
        out.append(f"net.hidden = {net.hidden} > {MAX_HIDDEN}")
    if not 1 <= net.depth <= MAX_DEPTH:
        out.append(f"net.depth = {net.depth} is outside 1..{MAX_DEPTH}")
    if net.act_dim > MAX_ACT_DIM:
        out.append(f"net.act_dim = {net.act_dim} > {MAX_ACT_DIM}")
    if net.activation not in ACT_CODES:
        out.append(f"activation {net.activation!r} has no kernel")
    return out


def _policy_call_reasons(net, x, obs, fast=False) -> List[str]:
    out = _net_reasons(net)
    if out:
        return out
    out += _dtype_reasons("x0" if x is not None else "obs", x if x is not None else obs)
    if x is not None and obs is not None and torch.is_tensor(obs) and obs.dtype != x.dtype:
        out.append(f"obs is {obs.dtype} but the noise is {x.dtype}: they must share a dtype")
    like = x if x is not None else obs
    if like is not None and torch.is_tensor(like):
        out += _module_reasons("net", net, like.dtype, like.device, fast)
        out += _grad_reasons("net", net, x, obs)
    return out


def supports_integrate(net=None, x0=None, obs=None, _fast=False, **_) -> List[str]:
    return _policy_call_reasons(net, x0, obs, _fast)


def supports_consistency_sample(net=None, noise=None, obs=None, _fast=False, **_) -> List[str]:
    return _policy_call_reasons(net, noise, obs, _fast)


def supports_sample(net=None, obs=None, _fast=False, **_) -> List[str]:
    return _policy_call_reasons(net, None, obs, _fast)


def supports_ddpm_sample(net=None, noise=None, obs=None, step_noise=None, _fast=False, **_) -> List[str]:
    out = _policy_call_reasons(net, noise, obs, _fast)
    if torch.is_tensor(step_noise) and torch.is_tensor(noise) and step_noise.dtype != noise.dtype:
        out.append(f"step_noise is {step_noise.dtype} but the noise is {noise.dtype}: they must share a dtype")
    if torch.is_tensor(step_noise) and step_noise.requires_grad and torch.is_grad_enabled():
        out.append("gradients are enabled and step_noise requires grad: the fused sampler has no backward "
                   "(use backend='torch')")
    return out


def supports_act(net=None, critic=None, obs=None, num_candidates=None, noise=None, _fast=False, **_) -> List[str]:
    out = _policy_call_reasons(net, noise if noise is not None else obs, obs, _fast)
    if not isinstance(critic, DoubleCritic) or type(critic).q_min is not DoubleCritic.q_min \
            or type(critic).forward is not DoubleCritic.forward:
        out.append(f"critic is a {type(critic).__name__}, not a qipo_kernels.nets.DoubleCritic")
    else:
        if critic.layer_norm:
            for mlp in (critic.q1_net, critic.q2_net):
                norms = [m for m in mlp.net if isinstance(m, nn.LayerNorm)]
                if any(tuple(m.normalized_shape) != (critic.hidden,) for m in norms) or \
                        len({float(m.eps) for m in norms}) > 1:
                    out.append("critic's LayerNorms are not LayerNorm(hidden) with one eps")
                    break
        if critic.hidden > MAX_HIDDEN:
            out.append(f"critic.hidden = {critic.hidden} > {MAX_HIDDEN}")
        if not 1 <= critic.depth <= MAX_DEPTH:
            out.append(f"critic.depth = {critic.depth} is outside 1..{MAX_DEPTH}")
        if critic.activation not in ACT_CODES:
            out.append(f"critic activation {critic.activation!r} has no kernel")
        if isinstance(net, ConditionalMLP) and (critic.act_dim != net.act_dim or critic.obs_dim != net.obs_dim):
            out.append(f"critic (obs {critic.obs_dim}, act {critic.act_dim}) does not match net "
                       f"(obs {net.obs_dim}, act {net.act_dim})")
        if obs is not None and torch.is_tensor(obs):
            out += _module_reasons("critic", critic, obs.dtype, obs.device, _fast)
            out += _grad_reasons("critic", critic)
    if isinstance(num_candidates, int) and num_candidates > MAX_CANDIDATES:
        out.append(f"num_candidates = {num_candidates} > {MAX_CANDIDATES} (one program holds all of a state's "
                   "candidates)")
    elif isinstance(num_candidates, int) and isinstance(net, ConditionalMLP) and isinstance(critic, DoubleCritic) \
            and torch.is_tensor(obs):
        r = act_candidates_reason(max(net.hidden, critic.hidden), num_candidates, obs.dtype, obs.device)
        if r:
            out.append(r)
    return out


# What dispatch asks on every call (the same reasons as supports_*, with a current pack answering for
# the parameters: the impl's _entry raises Fallback if it no longer can). Written out per op rather
# than wrapped: each call's arguments then reach the check without re-packing a kwargs dict.
def _plain_call(net, x, obs) -> bool:
    """True when every condition of _policy_call_reasons(net, x, obs, fast=True) holds, tested in one
    expression for the common case (a plain ConditionalMLP, float32 tensors, a pack made from float32
    parameters on x's device, no autograd); False sends the call to the full check, which says why."""
    if net.__class__ is not ConditionalMLP or x.__class__ is not torch.Tensor or obs.__class__ is not torch.Tensor \
            or x.dtype is not torch.float32 or obs.dtype is not torch.float32:
        return False
    if not (net.hidden <= MAX_HIDDEN and 1 <= net.depth <= MAX_DEPTH and net.act_dim <= MAX_ACT_DIM
            and net.activation in ACT_CODES):
        return False
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    ents = _PACKS.get(net)
    e = ents.get((torch.float32, x.device)) if ents is not None else None
    return e is not None and e.ok


def _fast_integrate(net=None, x0=None, obs=None, **_) -> List[str]:
    if _plain_call(net, x0, obs):
        return []
    return _policy_call_reasons(net, x0, obs, True)


def _fast_consistency_sample(net=None, noise=None, obs=None, **_) -> List[str]:
    if _plain_call(net, noise, obs):
        return []
    return _policy_call_reasons(net, noise, obs, True)


def _fast_sample(net=None, obs=None, **_) -> List[str]:
    return _policy_call_reasons(net, None, obs, True)


def _fast_ddpm_sample(net=None, noise=None, obs=None, step_noise=None, **_) -> List[str]:
    return supports_ddpm_sample(net, noise, obs, step_noise, True)


def _fast_act(net=None, critic=None, obs=None, num_candidates=None, noise=None, **_) -> List[str]:
    # the common case in one expression (as _plain_call; a LayerNorm critic takes the full check,
    # which compares its LayerNorms' shapes and eps)
    if critic.__class__ is DoubleCritic and not critic.layer_norm and num_candidates.__class__ is int \
            and num_candidates <= MAX_CANDIDATES and _plain_call(net, noise if noise is not None else obs, obs) \
            and critic.hidden <= MAX_HIDDEN and 1 <= critic.depth <= MAX_DEPTH and critic.activation in ACT_CODES \
            and critic.act_dim == net.act_dim and critic.obs_dim == net.obs_dim \
            and not act_candidates_reason(max(net.hidden, critic.hidden), num_candidates, obs.dtype, obs.device):
        ents = _PACKS.get(critic)
        e = ents.get((torch.float32, obs.device)) if ents is not None else None
        if e is not None and e.ok:
            return []
    return supports_act(net, critic, obs, num_candidates, noise, True)
