"""Networks: the conditional MLP used as velocity / noise / consistency network, and the twin critic.

Both are plain ``nn.Module``s. The fused samplers (Triton, C++) read their weights straight from
these modules, so the architecture here is the contract the kernels implement:

    ConditionalMLP.forward(x [N, A], t [N] or scalar, obs [N, S]) -> [N, A]
        e   = time_embedding(t)                          [N, T]
        h_0 = concat[x, e, obs]                          [N, A + T + S]
        h_k = act(Linear_k(h_{k-1}))      k = 1..depth   [N, H]
        out = Linear_out(h_depth)                        [N, A]

This is the architecture family of Diffusion-QL and CPQL (their ``MLP`` with ``mid_layer`` and
``final_layer``); ``from_cpql_state_dict`` loads a trained actor of theirs.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("mish", "silu", "relu", "gelu", "tanh")
TIME_EMBEDDINGS = ("sinusoidal", "fourier", "raw")


class _MishFn(torch.autograd.Function):
    """Mish, exact, with a cheaper backward than PyTorch's CPU kernel (forward + backward about 1.5x
    faster on one thread; bench/bench_mish.py, bench/bench_train_step.py).

    With e = exp(x) (x clamped at 20, where tanh(softplus(x)) is 1 in float32 and float64 to ~1e-17)
    and n = e (e + 2):  tanh(softplus(x)) = n / (n + 2), so mish(x) = x (n / (n + 2)) (no cancellation
    for negative x, no overflow for huge x), and mish'(x) = e ((e + 2)(n + 2) + 4 x (e + 1)) / (n + 2)^2, computed in the
    forward when a gradient is needed (one saved tensor, a one-pass backward).
    """

    @staticmethod
    def forward(ctx, x):
        xc = x.clamp(max=20.0)
        e = torch.exp(xc)
        n = torch.addcmul(e, e, e).add_(e)         # e^2 + 2e
        d = n + 2.0
        y = torch.div(n, d).mul_(x)
        if ctx.needs_input_grad[0]:
            # (x clamped in the 4 x (e + 1) term too: beyond 20 it adds < 1e-24 to the derivative 1)
            num = (e + 2.0).mul_(d)                 # (e + 2) d
            num.addcmul_(xc, e, value=4.0).add_(xc, alpha=4.0)   # + 4 x (e + 1)
            num.mul_(e).div_(d.square_())
            ctx.save_for_backward(num)
        return y

    @staticmethod
    def backward(ctx, grad):
        (dmish,) = ctx.saved_tensors
        return grad * dmish


def mish(x: torch.Tensor) -> torch.Tensor:
    """x tanh(softplus(x)): _MishFn when a gradient is wanted of a CPU tensor (its forward + backward
    is the faster one), F.mish otherwise (its forward alone is faster; bench/results/mish_cpu.md)."""
    if x.requires_grad and torch.is_grad_enabled() and x.is_cpu and x.dtype in (torch.float32, torch.float64):
        return _MishFn.apply(x)
    return F.mish(x)


def activation_fn(name: str):
    """Return the elementwise function for an activation name (one of ``ACTIVATIONS``).

    ``gelu`` is the tanh approximation, so every backend computes the same function. ``mish`` is the
    exact reformulation ``mish`` above on CPU tensors (F.mish on other devices).
    """
    if name == "mish":
        return mish
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name == "gelu":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = activation_fn(name)

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal features of a scalar time: [N] -> [N, dim] (sin half, cos half)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim must be an even number >= 4, got {dim}")
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar time (QGPO/QIPO ScoreNet): [N] -> [N, dim].

    W ~ N(0, scale^2) is fixed (a buffer, saved with the model); features are
    [sin(2π t W), cos(2π t W)].
    """

    def __init__(self, dim: int = 32, scale: float = 30.0, seed: int = 0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even number >= 2, got {dim}")
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = 2.0 * math.pi * t[:, None] * self.W.to(t.dtype)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


def _as_time_vector(t, n: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a python scalar, 0-d tensor, [1] or [N] time to a [N] tensor on like's device/dtype."""
    if not torch.is_tensor(t):
        return torch.full((n,), float(t), dtype=like.dtype, device=like.device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and n != 1):
        return t.reshape(1).to(like.dtype).expand(n)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"t must be a scalar or have shape [{n}], got {tuple(t.shape)}")
    return t.to(like.dtype)


class ConditionalMLP(nn.Module):
    """Velocity / noise / consistency network conditioned on time and observation.

    Args:
        act_dim: action dimension A.
        obs_dim: observation dimension S.
        hidden: hidden width H (the fused samplers support H <= 512).
        depth: number of hidden Linear+activation layers (1..6 for the fused samplers).
        activation: one of ``ACTIVATIONS`` (mish, silu, relu, gelu (tanh approx.), tanh).
        time_embedding: ``"sinusoidal"`` (Diffusion-QL/CPQL: SinusoidalPosEmb(t_dim) -> Linear(t_dim,
            2 t_dim) -> act -> Linear(2 t_dim, t_dim)), ``"fourier"`` (QGPO/QIPO Gaussian Fourier
            features, scale ``fourier_scale``, then the same small MLP) or ``"raw"`` (t concatenated
            as one feature, FQL style).
        t_dim: width of the time embedding (16 as CPQL for sinusoidal, 32 for fourier by default).

    forward(x [N, A], t scalar | [N], obs [N, S]) -> [N, A]
    """

    def __init__(
        self,
        act_dim: int,
        obs_dim: int,
        hidden: int = 256,
        depth: int = 3,
        activation: str = "mish",
        time_embedding: str = "sinusoidal",
        t_dim: int | None = None,
        fourier_scale: float = 30.0,
    ):
        super().__init__()
        for name, v in (("act_dim", act_dim), ("obs_dim", obs_dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}")
        self.act_dim, self.obs_dim, self.hidden, self.depth = act_dim, obs_dim, hidden, depth
        self.activation, self.time_embedding = activation, time_embedding
        if time_embedding == "raw":
            self.t_dim = 1
            self.time_mlp = None
        else:
            self.t_dim = t_dim if t_dim is not None else (16 if time_embedding == "sinusoidal" else 32)
            feats = (
                SinusoidalPosEmb(self.t_dim)
                if time_embedding == "sinusoidal"
                else GaussianFourierProjection(self.t_dim, fourier_scale)
            )
            self.time_mlp = nn.Sequential(
                feats, nn.Linear(self.t_dim, 2 * self.t_dim), _Act(activation), nn.Linear(2 * self.t_dim, self.t_dim)
            )
        in_dim = act_dim + self.t_dim + obs_dim
        self.layers = nn.ModuleList(
            [nn.Linear(in_dim if i == 0 else hidden, hidden) for i in range(depth)]
        )
        self.out = nn.Linear(hidden, act_dim)
        self._act = activation_fn(activation)
        # what the network was trained as, when a loader knows: "flow", "consistency", "ddpm" or None;
        # ops.act picks its sampler from it and refuses another (see ops.resolve_sampler)
        self.kind = None
        self.ddpm_schedule = None  # a reference.ddpm.DDPMSchedule read from a Diffusion-QL checkpoint

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """Time embedding e(t): [N] -> [N, t_dim]."""
        if self.time_mlp is None:
            return t[:, None]
        return self.time_mlp(t)

    def forward(self, x: torch.Tensor, t, obs: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.act_dim:
            raise ValueError(f"x must have shape [N, {self.act_dim}], got {tuple(x.shape)}")
        if obs.dim() != 2 or obs.shape != (x.shape[0], self.obs_dim):
            raise ValueError(f"obs must have shape [{x.shape[0]}, {self.obs_dim}], got {tuple(obs.shape)}")
        tt = _as_time_vector(t, x.shape[0], x)
        h = torch.cat([x, self.embed_time(tt), obs], dim=-1)
        for lin in self.layers:
            h = self._act(lin(h))
        return self.out(h)

    def config(self) -> Dict[str, object]:
        """Constructor arguments (for checkpoints)."""
        return dict(
            act_dim=self.act_dim, obs_dim=self.obs_dim, hidden=self.hidden, depth=self.depth,
            activation=self.activation, time_embedding=self.time_embedding, t_dim=self.t_dim,
        )

    @classmethod
    def from_cpql_state_dict(cls, state_dict: Mapping[str, torch.Tensor], obs_dim: int, act_dim: int,
                             kind: Optional[str] = None) -> "ConditionalMLP":
        """Build a ConditionalMLP holding a CPQL / Diffusion-QL ``MLP`` actor's weights.

        Their module (``agents/model.py``) is::

            time_mlp = Sequential(SinusoidalPosEmb(16), Linear(16, 32), Mish(), Linear(32, 16))
            mid_layer = Sequential(Linear(A + 16 + S, 256), Mish(), Linear(256, 256), Mish(),
                                   Linear(256, 256), Mish())
            final_layer = Linear(256, A)
            forward: cat([x, time_mlp(t), state]) -> mid_layer -> final_layer

        Keys ``time_mlp.1.*``, ``time_mlp.3.*``, ``mid_layer.{0,2,4,...}.*`` and ``final_layer.*``
        map onto ``time_mlp.1/3``, ``layers.{0,1,2,...}`` and ``out``. An optional ``model.``
        prefix (Diffusion-QL's ``Diffusion`` wrapper's attribute) is stripped. Sizes are read from the tensors.

        ``kind`` (set on the result as ``net.kind``): None = detect: a state_dict carrying Diffusion-QL's
        DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...; what ``Diffusion_QL.save_model``
        writes) is a "ddpm" actor, and its schedule is kept as ``net.ddpm_schedule``; a bare ``MLP``
        state_dict (CPQL's ``save_model``, or a Diffusion-QL ``MLP`` saved alone) says nothing and
        leaves ``kind`` None. A ``kind`` that contradicts the buffers raises.
        """
        from .reference import ddpm as _ddpm

        has_sched = any(k in state_dict for k in _ddpm.BUFFERS)
        if kind is not None and kind not in ("flow", "consistency", "ddpm"):
            raise ValueError(f"kind must be one of ('flow', 'consistency', 'ddpm') or None, got {kind!r}")
        if has_sched and kind not in (None, "ddpm"):
            raise ValueError(f"kind={kind!r}, but this state_dict carries Diffusion-QL's DDPM schedule buffers "
                             f"({[k for k in _ddpm.BUFFERS if k in state_dict][:3]}...): it is a DDPM actor, "
                             "which only the 'ddpm' sampler samples correctly")
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()
              if k not in _ddpm.BUFFERS}
        need = ["time_mlp.1.weight", "time_mlp.3.weight", "final_layer.weight", "mid_layer.0.weight"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"state_dict is not a CPQL/Diffusion-QL MLP: missing keys {missing}")
        mid = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mid_layer.") and k.endswith(".weight")})
        hidden = sd["mid_layer.0.weight"].shape[0]
        t_dim = sd["time_mlp.3.weight"].shape[0]
        if sd["mid_layer.0.weight"].shape[1] != act_dim + t_dim + obs_dim:
            raise ValueError(
                f"mid_layer.0 takes {sd['mid_layer.0.weight'].shape[1]} inputs, expected "
                f"act_dim + t_dim + obs_dim = {act_dim} + {t_dim} + {obs_dim}"
            )
        net = cls(act_dim, obs_dim, hidden=hidden, depth=len(mid), activation="mish",
                  time_embedding="sinusoidal", t_dim=t_dim)
        ours = {
            "time_mlp.1.weight": sd["time_mlp.1.weight"], "time_mlp.1.bias": sd["time_mlp.1.bias"],
            "time_mlp.3.weight": sd["time_mlp.3.weight"], "time_mlp.3.bias": sd["time_mlp.3.bias"],
            "out.weight": sd["final_layer.weight"], "out.bias": sd["final_layer.bias"],
        }
        for i, j in enumerate(mid):
            ours[f"layers.{i}.weight"] = sd[f"mid_layer.{j}.weight"]
            ours[f"layers.{i}.bias"] = sd[f"mid_layer.{j}.bias"]
        net.load_state_dict(ours)
        net.kind = "ddpm" if has_sched else kind
        if has_sched:
            net.ddpm_schedule = _ddpm.DDPMSchedule.from_state_dict(state_dict)
        return net


class MLP(nn.Module):
    """Plain MLP [N, in] -> [N, out] with depth hidden layers, optional LayerNorm after each Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, depth: int = 3,
                 activation: str = "mish", layer_norm: bool = False):
        super().__init__()
        mods = []
        d = in_dim
        for _ in range(depth):
            mods.append(nn.Linear(d, hidden))
            if layer_norm:
                mods.append(nn.LayerNorm(hidden))
            mods.append(_Act(activation))
            d = hidden
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class DoubleCritic(nn.Module):
    """Twin Q network: q1(obs, act), q2(obs, act), each MLP [S + A -> H x depth -> 1].

    forward(obs [N, S], act [N, A]) -> (q1 [N], q2 [N]);  q_min(obs, act) -> [N].
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3,
                 activation: str = "mish", layer_norm: bool = False):
        super().__init__()
        for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(layer_norm, bool):  # ("yes", 0, None would silently mean one or the other)
            raise TypeError(f"layer_norm must be a bool, got {type(layer_norm).__name__} {layer_norm!r}")
        self.obs_dim, self.act_dim, self.hidden, self.depth = obs_dim, act_dim, hidden, depth
        self.activation, self.layer_norm = activation, layer_norm
        self.q1_net = MLP(obs_dim + act_dim, 1, hidden, depth, activation, layer_norm)
        self.q2_net = MLP(obs_dim + act_dim, 1, hidden, depth, activation, layer_norm)

    def _input(self, obs, act):
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must have shape [N, {self.obs_dim}], got {tuple(obs.shape)}")
        if act.dim() != 2 or act.shape != (obs.shape[0], self.act_dim):
            raise ValueError(f"act must have shape [{obs.shape[0]}, {self.act_dim}], got {tuple(act.shape)}")
        return torch.cat([obs, act], dim=-1)

    def forward(self, obs, act):
        x = self._input(obs, act)
        return self.q1_net(x).squeeze(-1), self.q2_net(x).squeeze(-1)

    def q1(self, obs, act):
        return self.q1_net(self._input(obs, act)).squeeze(-1)

    def q2(self, obs, act):
        return self.q2_net(self._input(obs, act)).squeeze(-1)

    def q_min(self, obs, act):
        q1, q2 = self(obs, act)
        return torch.minimum(q1, q2)

    def config(self) -> Dict[str, object]:
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, hidden=self.hidden, depth=self.depth,
                    activation=self.activation, layer_norm=self.layer_norm)

    # ---- loading the official critics -------------------------------------------------------------
    @classmethod
    def from_cpql_state_dict(cls, state_dict: Mapping[str, torch.Tensor], obs_dim: Optional[int] = None,
                             act_dim: Optional[int] = None, activation: str = "mish") -> "DoubleCritic":
        """A CPQL ``Critic`` (agents/model.py) state_dict as a DoubleCritic. Their heads are::

            q{1,2}_model = Sequential(Linear(S + A, H), LN, Mish, Linear(H, H), LN, Mish,
                                      Linear(H, H), LN, Mish, Linear(H, 1))

        with LN = LayerNorm(H) offline (rl_type "offline") or Identity online: keys ``q1_model.{0,3,6,9}.*``
        (+ ``{1,4,7}.*`` for the LayerNorms); their ``v_model.*`` (an IQL value net, not part of the twin
        Q) is ignored. Give obs_dim or act_dim (the tensors hold only their sum); see from_official_state_dict.
        """
        return cls.from_official_state_dict(state_dict, "cpql", obs_dim, act_dim, activation)

    @classmethod
    def from_diffusion_ql_state_dict(cls, state_dict: Mapping[str, torch.Tensor], obs_dim: Optional[int] = None,
                                     act_dim: Optional[int] = None, activation: str = "mish") -> "DoubleCritic":
        """A Diffusion-QL ``Critic`` (agents/ql_diffusion.py) state_dict as a DoubleCritic: heads
        ``q{1,2}_model = Sequential(Linear(S + A, H), Mish, Linear(H, H), Mish, Linear(H, H), Mish, Linear(H, 1))``,
        keys ``q1_model.{0,2,4,6}.*``. Give obs_dim or act_dim; see from_official_state_dict."""
        return cls.from_official_state_dict(state_dict, "diffusion_ql", obs_dim, act_dim, activation)

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], layout: str = "auto",
                                 obs_dim: Optional[int] = None, act_dim: Optional[int] = None,
                                 activation: str = "mish") -> "DoubleCritic":
        """Load a CPQL / Diffusion-QL twin critic (``q1_model.*`` / ``q2_model.*`` Sequentials).

        Args:
            layout: "cpql" (Linear, LayerNorm or Identity, Mish per hidden layer: a Linear every 3
                indices), "diffusion_ql" (Linear, Mish: every 2) or "auto" (whichever fits).
            obs_dim, act_dim: the split of the first layer's input [obs, act] (only their sum is in the
                tensors): give one of them (or both, checked); the result's q1 / q2 / q_min take
                (obs [N, obs_dim], act [N, act_dim]) as the official ``q_min(state, action)``.
            activation: the hidden activation (theirs: Mish; not stored in a state_dict).
        Unknown layouts (other module indices, shapes that do not chain, a head that does not end in
        one output, LayerNorms on only some layers) raise ValueError naming what was found.
        """
        if layout not in ("auto", "cpql", "diffusion_ql"):
            raise ValueError(f"layout must be 'auto', 'cpql' or 'diffusion_ql', got {layout!r}")
        sd = {k[len("critic."):] if k.startswith("critic.") else k: v for k, v in state_dict.items()}
        heads = {}
        for h in ("q1_model", "q2_model"):
            mods: Dict[int, Dict[str, torch.Tensor]] = {}
            for k, v in sd.items():
                if k.startswith(h + "."):
                    parts = k.split(".")
                    if len(parts) != 3 or not parts[1].isdigit():
                        raise ValueError(f"unknown critic layout: key {k!r} is not {h}.<index>.<weight|bias>")
                    mods.setdefault(int(parts[1]), {})[parts[2]] = v
            if not mods:
                raise ValueError(f"unknown critic layout: no {h}.* keys (expected CPQL's / Diffusion-QL's Critic with "
                                 f"q1_model / q2_model Sequentials); keys start with {sorted({k.split('.')[0] for k in sd})}")
            heads[h] = mods
        layouts = ("cpql", "diffusion_ql") if layout == "auto" else (layout,)
        errors = []
        for lay in layouts:
            try:
                return cls._from_heads(heads, lay, obs_dim, act_dim, activation)
            except ValueError as e:
                errors.append(f"{lay}: {e}")
        raise ValueError("unknown critic layout: " + "; ".join(errors))

    @classmethod
    def _from_heads(cls, heads, lay, obs_dim, act_dim, activation):
        unit = 3 if lay == "cpql" else 2
        parsed = []
        for h, mods in heads.items():
            idx = sorted(mods)
            lin = [i for i in idx if mods[i].get("weight") is not None and mods[i]["weight"].dim() == 2]
            norms = [i for i in idx if i not in lin]
            n_lin = len(lin)
            if n_lin < 2 or lin != [unit * j for j in range(n_lin)]:
                raise ValueError(f"{h} has Linear layers at {lin}, expected at 0, {unit}, {2 * unit}, ...")
            if norms and (unit != 3 or norms != [unit * j + 1 for j in range(n_lin - 1)]):
                raise ValueError(f"{h} has 1-d (LayerNorm) parameters at {norms}; expected none"
                                 + (f" or at every {', '.join(str(unit * j + 1) for j in range(n_lin - 1))}"
                                    if unit == 3 else ""))
            for i in lin:
                if set(mods[i]) != {"weight", "bias"}:
                    raise ValueError(f"{h}.{i} has {sorted(mods[i])}, expected weight and bias")
            for i in norms:
                H = mods[i - 1]["weight"].shape[0]
                if set(mods[i]) != {"weight", "bias"} or any(t.shape != (H,) for t in mods[i].values()):
                    raise ValueError(f"{h}.{i} is not a LayerNorm({H}) (weight and bias [{H}])")
            ws = [mods[i]["weight"] for i in lin]
            H, D = ws[0].shape
            for a, b in zip(ws[:-1], ws[1:]):
                if b.shape[1] != a.shape[0]:
                    raise ValueError(f"{h}'s Linear shapes do not chain: {[tuple(w.shape) for w in ws]}")
            if ws[-1].shape[0] != 1 or any(w.shape[0] != H for w in ws[:-1]):
                raise ValueError(f"{h} must be Linear(S + A, H), (Linear(H, H))*, Linear(H, 1); got "
                                 f"{[tuple(w.shape) for w in ws]}")
            parsed.append((lin, norms, D, H))
        (l1, n1, D, H), (l2, n2, D2, H2) = parsed
        if (l1, bool(n1), D, H) != (l2, bool(n2), D2, H2):
            raise ValueError("q1_model and q2_model differ in layout or size")
        if obs_dim is None and act_dim is None:
            raise ValueError(f"the first layer takes obs_dim + act_dim = {D} inputs: give obs_dim or act_dim")
        if obs_dim is None:
            obs_dim = D - act_dim
        if act_dim is None:
            act_dim = D - obs_dim
        if obs_dim + act_dim != D or obs_dim < 1 or act_dim < 1:
            raise ValueError(f"obs_dim + act_dim must be the first layer's {D} inputs, got {obs_dim} + {act_dim}")
        depth = len(l1) - 1
        critic = cls(obs_dim, act_dim, hidden=H, depth=depth, activation=activation, layer_norm=bool(n1))
        ours = {}
        ounit = 3 if n1 else 2  # nets.MLP: [Linear, (LayerNorm,) act] x depth + Linear
        for h, name in (("q1_model", "q1_net"), ("q2_model", "q2_net")):
            mods = heads[h]
            for j, i in enumerate(l1):
                for p in ("weight", "bias"):
                    ours[f"{name}.net.{ounit * j}.{p}"] = mods[i][p]
                    if n1 and j < depth:
                        ours[f"{name}.net.{ounit * j + 1}.{p}"] = mods[i + 1][p]
        critic.load_state_dict(ours)
        return critic
