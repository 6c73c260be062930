import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qipo_kernels.nets import ACTIVATIONS, TIME_EMBEDDINGS, ConditionalMLP, DoubleCritic


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("time_embedding", TIME_EMBEDDINGS)
def test_conditional_mlp_shapes_and_time_forms(activation, time_embedding):
    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=24, depth=2, activation=activation, time_embedding=time_embedding)
    x, obs = torch.randn(5, 6), torch.randn(5, 17)
    out = net(x, torch.full((5,), 0.3), obs)
    assert out.shape == (5, 6) and torch.isfinite(out).all()
    # scalar, 0-d and [1] times broadcast to every row and give the same result
    for t in (0.3, torch.tensor(0.3), torch.tensor([0.3])):
        torch.testing.assert_close(net(x, t, obs), out)
    # rows are independent: evaluating one row alone gives the same row
    torch.testing.assert_close(net(x[2:3], 0.3, obs[2:3]), out[2:3])


def test_conditional_mlp_matches_hand_written_forward():
    torch.manual_seed(1)
    net = ConditionalMLP(3, 4, hidden=8, depth=2, activation="tanh", time_embedding="raw")
    x, obs, t = torch.randn(7, 3), torch.randn(7, 4), torch.rand(7)
    h = torch.cat([x, t[:, None], obs], 1)
    for lin in net.layers:
        h = torch.tanh(h @ lin.weight.T + lin.bias)
    torch.testing.assert_close(net(x, t, obs), h @ net.out.weight.T + net.out.bias)


def test_conditional_mlp_bad_input():
    net = ConditionalMLP(6, 17, hidden=8, depth=1)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(5, 5), 0.1, torch.randn(5, 17))
    with pytest.raises(ValueError, match="obs must have shape"):
        net(torch.randn(5, 6), 0.1, torch.randn(4, 17))
    with pytest.raises(ValueError, match="t must be"):
        net(torch.randn(5, 6), torch.rand(4), torch.randn(5, 17))
    with pytest.raises(ValueError, match="activation"):
        ConditionalMLP(6, 17, activation="swish2")
    with pytest.raises(ValueError, match="time_embedding"):
        ConditionalMLP(6, 17, time_embedding="learned")
    with pytest.raises(ValueError, match="hidden"):
        ConditionalMLP(6, 17, hidden=0)


class _CpqlSinusoidal(nn.Module):
    """The sinusoidal features as Diffusion-QL/CPQL define them, written from their formula."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=x.dtype) * -scale)
        arg = x[:, None] * freqs[None, :]
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class _CpqlMLP(nn.Module):
    """Their actor's module layout (names as in agents/model.py), for the converter test."""

    def __init__(self, state_dim, action_dim, t_dim=16):
        super().__init__()
        self.time_mlp = nn.Sequential(_CpqlSinusoidal(t_dim), nn.Linear(t_dim, t_dim * 2), nn.Mish(),
                                      nn.Linear(t_dim * 2, t_dim))
        self.mid_layer = nn.Sequential(nn.Linear(state_dim + action_dim + t_dim, 256), nn.Mish(),
                                       nn.Linear(256, 256), nn.Mish(), nn.Linear(256, 256), nn.Mish())
        self.final_layer = nn.Linear(256, action_dim)

    def forward(self, x, time, state):
        t = self.time_mlp(time)
        return self.final_layer(self.mid_layer(torch.cat([x, t, state], dim=1)))


@pytest.mark.parametrize("prefix", ["", "model."])
def test_from_cpql_state_dict_reproduces_their_actor(prefix):
    torch.manual_seed(2)
    theirs = _CpqlMLP(17, 6)
    sd = {prefix + k: v for k, v in theirs.state_dict().items()}
    ours = ConditionalMLP.from_cpql_state_dict(sd, obs_dim=17, act_dim=6)
    x, obs = torch.randn(9, 6), torch.randn(9, 17)
    t = 250 * torch.log(torch.rand(9) * 80 + 1e-44)  # CPQL's time input range
    torch.testing.assert_close(ours(x, t, obs), theirs(x, t, obs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected act_dim"):
        ConditionalMLP.from_cpql_state_dict(sd, obs_dim=16, act_dim=6)
    with pytest.raises(ValueError, match="missing keys"):
        ConditionalMLP.from_cpql_state_dict({"foo": torch.zeros(1)}, obs_dim=17, act_dim=6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_double_critic(layer_norm):
    torch.manual_seed(3)
    c = DoubleCritic(17, 6, hidden=32, depth=3, activation="relu", layer_norm=layer_norm)
    obs, act = torch.randn(11, 17), torch.randn(11, 6)
    q1, q2 = c(obs, act)
    assert q1.shape == (11,) and q2.shape == (11,)
    assert not torch.allclose(q1, q2)  # independent heads
    torch.testing.assert_close(c.q_min(obs, act), torch.minimum(q1, q2))
    torch.testing.assert_close(c.q1(obs, act), q1)
    torch.testing.assert_close(c.q2(obs, act), q2)
    with pytest.raises(ValueError, match="act must have shape"):
        c(obs, act[:, :5])
    with pytest.raises(ValueError, match="obs must have shape"):
        c(obs[:, :3], act)
    if layer_norm:
        assert any(isinstance(m, nn.LayerNorm) for m in c.modules())


def test_gelu_is_tanh_approximation():
    from qipo_kernels.nets import activation_fn

    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(activation_fn("gelu")(x), F.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(17,), (6, 1000), (3, 5, 7)])
def test_fast_mish_matches_float64_mish_and_its_gradient(dtype, shape):
    """nets.mish (the reformulated CPU Mish the networks use) against F.mish in float64, values and
    gradients, on fresh random inputs over a wide range plus the edge values."""
    from qipo_kernels.nets import _MishFn, mish

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 6
    edges = torch.tensor([-1e30, -1e4, -100.0, -30.0, -20.0, -1.0, 0.0, 1.0, 19.9, 20.0, 20.1, 30.0, 1e4, 1e30],
                         dtype=torch.float64)
    x.view(-1)[: edges.numel()] = edges[: x.numel()]
    xt = x.to(dtype).requires_grad_()
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    xd = xt.detach().double().requires_grad_()
    want = F.mish(xd)
    want_grad = torch.autograd.grad(want, xd, gy)[0]
    got = mish(xt)
    assert got.dtype == dtype and got.shape == x.shape
    got_grad = torch.autograd.grad(got, xt, gy.to(dtype))[0]
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=tol * 4, rtol=tol * 4)
    if dtype == torch.float64:
        small = (torch.randn(40, generator=g, dtype=torch.float64) * 5).requires_grad_()
        assert torch.autograd.gradcheck(_MishFn.apply, (small,))
    with torch.no_grad():  # no gradient wanted: nothing saved, same values
        torch.testing.assert_close(mish(xt.detach()), got.detach())
    nan = mish(torch.tensor([float("nan"), float("inf")], dtype=dtype))
    assert torch.isnan(nan[0]) and nan[1] == float("inf")


def test_networks_use_the_fast_mish_on_cpu():
    from qipo_kernels.nets import mish

    net = ConditionalMLP(3, 4, hidden=8, depth=2)
    assert net._act is mish
    x, obs, t = torch.randn(7, 3), torch.randn(7, 4), torch.rand(7)
    h = torch.cat([x, net.embed_time(t), obs], 1)
    for lin in net.layers:
        h = F.mish(lin(h))
    torch.testing.assert_close(net(x, t, obs), net.out(h), atol=2e-6, rtol=2e-6)
