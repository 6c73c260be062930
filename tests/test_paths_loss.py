import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qipo_kernels import reference as R
from qipo_kernels import ops


def test_flow_path_closed_forms(gen):
    a = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    t = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    x, tgt = R.flow_path(a, z, t, "ot")
    torch.testing.assert_close(x, t[..., None] * a + (1 - t[..., None]) * z)
    torch.testing.assert_close(tgt, a - z)
    x2, tgt2 = R.flow_path(a, z, t, "ot-eps")
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(tgt2, z)
    x3, tgt3 = R.flow_path(a, z, t, "vp")
    s = 1 - t
    alpha = torch.exp(-0.25 * s ** 2 * (20 - 0.1) - 0.5 * s * 0.1)
    torch.testing.assert_close(x3, alpha[..., None] * a + torch.sqrt(1 - alpha ** 2)[..., None] * z)
    torch.testing.assert_close(tgt3, z)
    # the OT velocity is d x_t / dt
    torch.testing.assert_close(tgt, a - z)


def test_vp_schedule_ends_and_log_snr_inverse():
    t = torch.tensor([0.0, 1.0 - 1e-3, 1.0], dtype=torch.float64)
    alpha, sigma = R.alpha_sigma(t, "vp")
    assert abs(float(alpha[0]) - math.exp(-0.25 * 19.9 - 0.05)) < 1e-12  # almost pure noise at t = 0
    assert float(alpha[2]) == 1.0 and float(sigma[2]) == 0.0  # data at t = 1
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(3, dtype=torch.float64))
    for path in ("vp", "ot-eps"):
        tt = torch.linspace(0.01, 0.99, 57, dtype=torch.float64)
        torch.testing.assert_close(R.inverse_log_snr(R.log_snr(tt, path), path), tt, atol=1e-10, rtol=0)


def _naive_loss(pred, target, energy, beta, normalize, pair_weight=None):
    """Loops over states: an independent spelling of the formula, in float64."""
    B, M, _ = pred.shape
    pp = ((pred.double() - target.double()) ** 2).sum(-1)
    if pair_weight is not None:
        pp = pp * pair_weight.double()
    if energy is None:
        return pp.mean()
    e = energy.double() * beta
    if normalize == "support":
        total = 0.0
        for b in range(B):
            w = torch.exp(e[b] - e[b].max())
            total = total + (w / w.sum() * pp[b]).sum()
        return total / B
    w = torch.exp(e - e.max())
    return (w / w.sum() * pp).sum()


@pytest.mark.parametrize("normalize", ["support", "batch"])
@pytest.mark.parametrize("shape", [(3, 17, 6), (1, 1, 1), (5, 64, 7), (2, 1000, 3)])
def test_weighted_fm_loss_matches_naive(gen, shape, normalize):
    pred = torch.randn(shape, generator=gen)
    tgt = torch.randn(shape, generator=gen)
    energy = torch.randn(shape[:2], generator=gen) * 10
    lam = torch.rand(shape[:2], generator=gen)
    for e, pw in ((energy, None), (None, None), (energy, lam)):
        got = R.weighted_fm_loss(pred, tgt, e, 3.0, normalize, pw)
        want = _naive_loss(pred, tgt, e, 3.0, normalize, pw)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_weighted_fm_loss_stable_for_large_beta_q(gen):
    pred = torch.randn(4, 9, 6, generator=gen)
    tgt = torch.randn(4, 9, 6, generator=gen)
    energy = 3000.0 + 500 * torch.randn(4, 9, generator=gen)  # Q in the thousands, beta * Q ~ 1e4
    for normalize in ("support", "batch"):
        got = R.weighted_fm_loss(pred, tgt, energy, 3.0, normalize)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), _naive_loss(pred, tgt, energy, 3.0, normalize), atol=1e-4, rtol=1e-4)
    # with gaps of 50 between Q values (beta * gap = 150) the support softmax picks each state's best action
    energy = 3000.0 + 50.0 * torch.stack([torch.randperm(9, generator=gen) for _ in range(4)]).float()
    best = energy.argmax(1)
    pp = ((pred - tgt) ** 2).sum(-1)
    torch.testing.assert_close(R.weighted_fm_loss(pred, tgt, energy, 3.0), pp[torch.arange(4), best].mean())


def test_weights_normalisation():
    energy = torch.randn(6, 11, dtype=torch.float64)
    ws = R.energy_weights(energy, 2.0, "support")
    torch.testing.assert_close(ws.sum(1), torch.ones(6, dtype=torch.float64))
    wb = R.energy_weights(energy, 2.0, "batch")
    torch.testing.assert_close(wb.mean(), torch.tensor(1.0, dtype=torch.float64))


def test_weighted_fm_loss_gradcheck():
    torch.manual_seed(0)
    pred = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    energy = torch.randn(3, 5, dtype=torch.float64)
    lam = torch.rand(3, 5, dtype=torch.float64)
    for normalize in ("support", "batch"):
        assert torch.autograd.gradcheck(lambda p, q: R.weighted_fm_loss(p, q, energy, 2.5, normalize, lam), (pred, tgt))
    # the weights are detached: no gradient reaches the energy
    e = energy.clone().requires_grad_(True)
    R.weighted_fm_loss(pred, tgt, e, 1.0).backward()
    assert e.grad is None


def test_flow_matching_loss_equals_path_plus_weighted_loss(gen):
    a, z, pred = (torch.randn(4, 7, 6, generator=gen) for _ in range(3))
    t = torch.rand(4, 7, generator=gen)
    energy = torch.randn(4, 7, generator=gen)
    for path in R.PATHS:
        _, tgt = R.flow_path(a, z, t, path)
        torch.testing.assert_close(R.flow_matching_loss(pred, a, z, t, path, energy, 3.0),
                                   R.weighted_fm_loss(pred, tgt, energy, 3.0))
        torch.testing.assert_close(ops.flow_matching_loss(pred, a, z, t, path, energy, 3.0, backend="torch"),
                                   R.weighted_fm_loss(pred, tgt, energy, 3.0))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), M=st.integers(1, 20), D=st.integers(1, 9),
       beta=st.floats(1e-3, 50.0), normalize=st.sampled_from(["support", "batch"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_weighted_fm_loss_hypothesis(B, M, D, beta, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    tgt = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    energy = torch.randn(B, M, generator=g, dtype=torch.float64) * 20
    got = R.weighted_fm_loss(pred, tgt, energy, beta, normalize)
    torch.testing.assert_close(got, _naive_loss(pred, tgt, energy, beta, normalize), atol=1e-9, rtol=1e-9)
    # bounded by the smallest and largest per-pair error (a convex combination, up to the batch scale)
    pp = ((pred - tgt) ** 2).sum(-1)
    if normalize == "support":
        assert pp.min() - 1e-9 <= got <= pp.max() + 1e-9


def test_loss_bad_input():
    p = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pred must be"):
        R.weighted_fm_loss(p[0], p[0])
    with pytest.raises(ValueError, match="target must have shape"):
        R.weighted_fm_loss(p, p[:, :2])
    with pytest.raises(ValueError, match="energy must have shape"):
        R.weighted_fm_loss(p, p, torch.randn(3, 2))
    with pytest.raises(ValueError, match="energy contains NaN"):
        R.weighted_fm_loss(p, p, torch.tensor([[0.0, float("nan"), 1.0]] * 2))
    with pytest.raises(ValueError, match="energy contains NaN or inf"):
        ops.weighted_fm_loss(p, p, torch.tensor([[0.0, float("inf"), 1.0]] * 2))
    with pytest.raises(ValueError, match="beta must be > 0"):
        R.weighted_fm_loss(p, p, torch.randn(2, 3), beta=0.0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        R.weighted_fm_loss(p, p, torch.randn(2, 3), normalize="global")
    with pytest.raises(TypeError, match="pred must have dtype"):
        R.weighted_fm_loss(p.long(), p)
    with pytest.raises(TypeError, match="target has dtype"):
        R.weighted_fm_loss(p, p.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        R.weighted_fm_loss(p.numpy(), p)
    with pytest.raises(ValueError, match="path must be one of"):
        R.flow_path(p, p, torch.rand(2, 3), "cosine")
    with pytest.raises(ValueError, match="t must have shape"):
        R.flow_path(p, p, torch.rand(2, 4), "ot")
    with pytest.raises(ValueError, match="noise must have the shape"):
        R.flow_path(p, p[:, :1], torch.rand(2, 3), "ot")


@pytest.mark.parametrize("normalize", ["support", "batch"])
@pytest.mark.parametrize("B,M", [(17, 6), (1, 1000), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_draw_weighted_pairs_draws_each_pair_with_its_weight(normalize, B, M, dtype):
    """The sampled estimator: each draw lands on (state, slot) with probability energy_weights / B
    ("support": exactly one slot per state) or / (B M) ("batch"), so the mean per-pair loss over the draws converges to
    weighted_fm_loss (the expectation is that loss, measured in float64)."""
    g = torch.Generator().manual_seed(B * 1000 + M)
    energy = (torch.randn(B, M, generator=g, dtype=torch.float64) * 2).to(dtype)
    beta, R_draws = 1.7, 4000 if M < 1000 else 400
    counts = torch.zeros(B, M, dtype=torch.float64)
    for _ in range(R_draws):
        rows, cols = R.draw_weighted_pairs(energy, beta, normalize, generator=g)
        assert rows.dtype == cols.dtype == torch.int64 and rows.shape == cols.shape == (B,)
        if normalize == "support":
            assert torch.equal(rows, torch.arange(B))
        counts.index_put_((rows, cols), torch.ones(B, dtype=torch.float64), accumulate=True)
    # probability of one draw landing on (b, m): "support" weights sum to 1 per state, "batch" ones to B * M
    p = R.energy_weights(energy.double(), beta, normalize) / (B if normalize == "support" else B * M)
    n = R_draws * B
    expected = n * p                 # binomial counts; the + 3 covers pairs with expected counts near 0
    assert ((counts - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 3).all()
    # the estimator's expectation: the weighted loss on fixed per-pair errors
    pred, tgt = (torch.randn(B, M, 3, generator=g, dtype=torch.float64) for _ in range(2))
    pp = ((pred - tgt) ** 2).sum(-1)
    full = R.weighted_fm_loss(pred, tgt, energy.double(), beta, normalize)
    est = (counts * pp).sum() / n
    assert abs(float(est - full)) <= 5 * float(((pp - full) ** 2 * p).sum().sqrt() / math.sqrt(n)) + 1e-9


def test_draw_weighted_pairs_large_beta_is_the_argmax_and_keeps_the_generator_stream():
    g = torch.Generator().manual_seed(0)
    energy = torch.randn(17, 6, generator=g) * 50 + 1e4    # large energies, small spread: max-subtracted
    rows, cols = R.draw_weighted_pairs(energy, 1e3, "support", generator=g)
    assert torch.equal(cols, energy.argmax(1))
    rows, cols = R.draw_weighted_pairs(energy, 1e3, "batch", generator=g)
    top = int(energy.argmax())
    assert (rows == top // 6).all() and (cols == top % 6).all()
    a = R.draw_weighted_pairs(energy, 0.01, generator=torch.Generator().manual_seed(5))
    b = R.draw_weighted_pairs(energy, 0.01, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[1], b[1])


def test_draw_weighted_pairs_bad_input():
    e = torch.randn(4, 3)
    with pytest.raises(ValueError, match="energy must be 2-d"):
        R.draw_weighted_pairs(e[0], 1.0)
    with pytest.raises(ValueError, match="energy must be non-empty"):
        R.draw_weighted_pairs(e[:0], 1.0)
    with pytest.raises(ValueError, match="energy contains NaN"):
        R.draw_weighted_pairs(torch.full((4, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        R.draw_weighted_pairs(e, 0.0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        R.draw_weighted_pairs(e, 1.0, "global")
    with pytest.raises(TypeError, match="energy must have dtype"):
        R.draw_weighted_pairs(e.long(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(17, 6), (6, 17, 3), (1000, 1)])
def test_dequantize_bounds_moves_only_the_bound_coordinates_outward(dtype, shape):
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(shape, generator=g, dtype=dtype) * 2.6 - 1.3).clamp(-1, 1)   # ~23% at each bound
    a.view(-1)[::7] = float("nan")
    z = torch.randn(shape, generator=g, dtype=dtype)
    out = R.dequantize_bounds(a, 0.25, z)
    at = a.abs() >= 1
    assert out.dtype == dtype and out.shape == a.shape and at.any()
    inside = ~at & ~a.isnan()
    assert torch.equal(out[inside], a[inside])
    assert out[a.isnan()].isnan().all()
    want = a[at].sign() * (1 + 0.25 * z[at].abs())             # float64 closed form, same z
    torch.testing.assert_close(out[at].double(), want.double(), rtol=0, atol=1e-7 if dtype == torch.float32 else 0)
    assert (out[at].abs() >= 1).all() and torch.equal(out[at].sign(), a[at].sign())
    # the sampler's clamp maps every moved coordinate back onto its bound
    torch.testing.assert_close(out.clamp(-1, 1), a, equal_nan=True)
    assert R.dequantize_bounds(a, 0.0) is a


def test_dequantize_bounds_draws_a_half_normal_excess_from_the_generator():
    a = torch.ones(200_000, 1)
    a[::2] = -1
    out = R.dequantize_bounds(a, 0.1, generator=torch.Generator().manual_seed(0))
    excess = (out.abs() - 1).double()
    assert float(excess.min()) >= 0
    # half-normal of scale 0.1: mean 0.1 sqrt(2 / pi), second moment 0.01 (5 s.e.)
    assert float(excess.mean()) == pytest.approx(0.1 * math.sqrt(2 / math.pi), abs=5 * 0.1 * 0.6 / math.sqrt(2e5))
    assert float((excess ** 2).mean()) == pytest.approx(0.01, rel=0.02)
    again = R.dequantize_bounds(a, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_dequantize_bounds_bad_input():
    a = torch.ones(4, 3)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        R.dequantize_bounds(a, -0.1)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        R.dequantize_bounds(a, float("nan"))
    with pytest.raises(ValueError, match="z must have shape"):
        R.dequantize_bounds(a, 0.1, torch.randn(4, 2))
    with pytest.raises(TypeError, match="actions must have dtype"):
        R.dequantize_bounds(a.long(), 0.1)
