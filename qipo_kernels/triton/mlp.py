"""The MLP-evaluation building blocks of the fused samplers, as @triton.jit helpers.

Stable names, importable by other kernels (``from qipo_kernels.triton.mlp import mlp_eval``):

    stable_tanh(z)                      tanh without overflow
    activation(x, ACT)                  ACT = ACT_CODES[name]: mish, silu, relu, gelu (tanh approx.), tanh
    dot(a, b, acc, PREC)                acc + a @ b; PREC = PREC_IEEE (float32 IEEE), PREC_TF32,
                                        PREC_HALF (bf16 / fp16 inputs), PREC_TF32X3 (float32 inputs on
                                        tensor cores with ~float32 accuracy); float32 accumulation
    tf32_split(x)                       (hi, lo) halves of float32 x for TF32x3
    load_obs_t(obs_ptr, state, valid, S, SP, cdt)
                                        the tile's obs rows, feature-major [SP, BM], compute dtype
    mlp_eval(xin, ot, trow, w1x, w1o, b1, wh, bh, wo, bo, lnw, lnb, HT, eps, HP, IN_PAD, SP, OUT_PAD,
             DEPTH, ACT, HAS_T, LN, BM, BN, PREC)
                                        one network evaluation of a tile: xin [BM, IN_PAD] float32 and
                                        the obs tile ot [SP, BM] -> [BM, OUT_PAD] float32
    net_eval(...)                       mlp_eval without LayerNorm (the policy network)

The packed weight layout these read (w1x [IN_PAD, HP], w1o [SP, HP] transposed to [in, out];
wh [D-1, HP, HP] and wo [OUT_PAD, HP] in nn.Linear's [out, in]; b1 [HP], bh [D-1, HP], bo [OUT_PAD],
lnw / lnb [D, HP] float32; all zero-padded to powers of two) is built by
qipo_kernels.triton.sampler_pack._mlp_tensors.

Layer pairing (mlp_eval): no hidden activation leaves the SM. The network is the chain of matrices
M_0 = layer 1 ([x | obs] -> H), M_1 .. M_{D-1} (H -> H), M_D = output. They are taken in pairs
(P, Q) = (M_p, M_p+1), feature-major (activations as [features, rows] tensors): the pair's input
ht [HP, BM] is one tensor; a loop over blocks n of P's output features computes
blk = act(P[n, :] @ ht + p[n]) [BN, BM] and at once acc += Q[:, n] @ blk (acc [HP, BM] or
[OUT_PAD, BM], float32, registers); after the loop ht = act(acc + q) (or acc + q is the output).
P's output never exists in full, Q's output is complete in registers, and every weight block is
loaded once per evaluation (the n loop is what Triton's pipeliner multi-buffers through shared
memory). The weights are the dots' A operands and the activations their B operands, which tensor
cores read from shared memory: Triton stores ht there once per pair (the store is hoisted out of
the n loop) and keeps no second register copy of it, so the register budget is the accumulator
plus one block. With an odd number of matrices (DEPTH even) layer 1 is computed full width first
(one dot with K = IN_PAD + SP, N = HP). Layer 1's block is W1x[n] x + W1o[n] obs + t[n] + b1[n]
with x and the obs tile in registers: the observation share is recomputed per evaluation (a K = SP
dot per block) instead of being kept in a scratch buffer.

Why feature-major: written row-major (h [BM, HP] @ P[:, n]) the activations are the A operand,
which Triton keeps in registers for wgmma and replicates in every warpgroup along N; at BM 128 /
HP 256 (bf16) or HP 512 that spills. The price of this orientation: the first dot of a pair has
M = BN (16 or 32 in the spill-free configurations), below wgmma's 64, so Triton emits mma.sync for
it; the second (M = HP) is a wgmma.

Split-K for float32 operands (IEEE and TF32x3): the pair's first dot has M = BN (16), so tensor
cores run it as mma.sync, whose A operand (the [BN, HP] weight block) every warp holds whole in
registers, twice over for TF32x3's high and low halves; at HP 256 that left 3-136 bytes of stack,
at HP 512 1 KB of spills. For these precisions the hidden layer's K = HP is cut in chunks of
K_SPLIT (32) written as one batched dot [HP / 32, BN, 32] @ [HP / 32, 32, BM] (the activations
reshaped, no copy in global memory) whose batch Triton spreads over the warps, then summed over the
chunks: each warp holds one chunk of the weights. bf16 / fp16 and TF32 keep the single dot (their
operands are half the size or have no low half, and the batched form raised their register use).

LayerNorm (CPQL's critics): a Q-position layer is normalised in registers (its output is complete);
a P-position layer needs its row statistics before the activation, so its blocks are computed twice
(pass 1: per-block mean and M2 merged as in Chan et al.'s parallel variance; pass 2: normalise,
activate, multiply into Q). That reads P's weights twice: the only exception to "once per
evaluation", paid only by LayerNorm critics (evaluated twice per act call, not per solver step).
"""
import triton
import triton.language as tl

ACT_CODES = {"mish": 0, "silu": 1, "relu": 2, "gelu": 3, "tanh": 4}
PREC_IEEE, PREC_TF32, PREC_HALF, PREC_TF32X3 = 0, 1, 2, 3
# K chunk of the split-K hidden-layer dot for float32 operands (IEEE, TF32x3); see _pre.
K_SPLIT = tl.constexpr(32)


@triton.jit
def stable_tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def activation(x, ACT: tl.constexpr):
    if ACT == 0:  # mish = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2)
        e = tl.exp(tl.minimum(x, 20.0))
        n = e * (e + 2.0)
        y = tl.where(x > 20.0, x, x * n / (n + 2.0))
    elif ACT == 1:  # silu = x sigmoid(x), sigmoid from e^{-|x|} (no overflow)
        e = tl.exp(-tl.abs(x))
        y = x * tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 2:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 3:  # gelu, tanh approximation
        y = 0.5 * x * (1.0 + stable_tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:  # tanh
        y = stable_tanh(x)
    return y


@triton.jit
def tf32_split(x):
    """(hi, lo) of float32 x: hi = x with the 13 low mantissa bits cleared (exact in TF32), lo = x - hi."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    # PREC: 0 IEEE float32 (FMA), 1 TF32, 2 half inputs (bf16 / fp16), 3 TF32x3 (float32 inputs split
    # in a TF32 high and low part, three tensor-core products: ~float32 accuracy); float32 accumulation.
    # TF32x3 is written out here rather than left to tl.dot's "tf32x3": the split of a loop-invariant
    # operand (a pair's activations) is then plain arithmetic that the compiler hoists out of the
    # column loop, instead of being redone next to every product.
    if PREC == 0:
        r = tl.dot(a, b, acc, input_precision="ieee")
    elif PREC == 1:
        r = tl.dot(a, b, acc, input_precision="tf32")
    elif PREC == 3:
        ah, al = tf32_split(a)
        bh, bl = tf32_split(b)
        r = tl.dot(al, bh, acc, input_precision="tf32")
        r = tl.dot(ah, bl, r, input_precision="tf32")
        r = tl.dot(ah, bh, r, input_precision="tf32")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def load_obs_t(obs_ptr, state, valid, S, SP: tl.constexpr, cdt: tl.constexpr):
    """The tile's observation rows, feature-major [SP, BM] (zero in padded rows / columns), in the
    compute dtype."""
    offs_s = tl.arange(0, SP)
    o = tl.load(obs_ptr + state[None, :] * S + offs_s[:, None], mask=valid[None, :] & (offs_s[:, None] < S),
                other=0.0)
    return o.to(cdt)


@triton.jit
def _pre(L: tl.constexpr, ht, xt, ot, trow, w1x, w1o, b1, wh, bh, rows,
         HP: tl.constexpr, IN_PAD: tl.constexpr, SP: tl.constexpr, HAS_T: tl.constexpr, PREC: tl.constexpr,
         BM: tl.constexpr, W: tl.constexpr):
    """Feature-major pre-activations [W, BM] float32 of matrix M_L for its output features ``rows``:
    layer 1 (L = 0) from xt [IN_PAD, BM] and ot [SP, BM]; hidden layer L from ht [HP, BM] (unused
    when L = 0). The weight block is the dot's A operand, the activations its B operand (which
    Triton keeps in shared memory, never in a second register copy)."""
    if L == 0:
        offs_i = tl.arange(0, IN_PAD)
        offs_s = tl.arange(0, SP)
        zb = tl.load(b1 + rows)
        if HAS_T:
            zb += tl.load(trow + rows)
        z = tl.zeros((W, BM), tl.float32) + zb[:, None]
        z = dot(tl.load(w1x + offs_i[None, :] * HP + rows[:, None]), xt, z, PREC)
        z = dot(tl.load(w1o + offs_s[None, :] * HP + rows[:, None]), ot, z, PREC)
    else:
        z = tl.zeros((W, BM), tl.float32) + tl.load(bh + (L - 1) * HP + rows)[:, None]
        if PREC == 0 or PREC == 3:
            # split-K (float32 operands): K = HP in NC chunks of KC as one batched dot
            # [NC, W, KC] @ [NC, KC, BM], whose batch Triton spreads over the warps, then summed over
            # the chunks. Done as one 2-D dot, every warp would hold the whole [W, HP] weight block
            # (and for TF32x3 its high and low halves) in registers: that spilled at HP 256 and 512.
            KC: tl.constexpr = min(K_SPLIT, HP)
            NC: tl.constexpr = HP // KC
            offs_c = tl.arange(0, NC)
            offs_kc = tl.arange(0, KC)
            w3 = tl.load(wh + (L - 1) * (HP * HP) + rows[None, :, None] * HP
                         + (offs_c[:, None, None] * KC + offs_kc[None, None, :]))
            z3 = dot(w3, tl.reshape(ht, (NC, KC, BM)), tl.zeros((NC, W, BM), tl.float32), PREC)
            z += tl.sum(z3, axis=0)
        else:
            offs_k = tl.arange(0, HP)
            z = dot(tl.load(wh + (L - 1) * (HP * HP) + rows[:, None] * HP + offs_k[None, :]), ht, z, PREC)
    return z


@triton.jit
def _ln_act_full(z, lnw, lnb, HT, ln_eps, HP: tl.constexpr, ACT: tl.constexpr):
    """act(LayerNorm(z)) of a complete feature-major block z [HP, BM] (float32, registers): statistics
    over the first HT features (biased variance, two passes over registers), affine; padded
    features give 0."""
    feats = tl.arange(0, HP)
    m = feats[:, None] < HT
    mean = tl.sum(tl.where(m, z, 0.0), axis=0) / HT
    d = tl.where(m, z - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / HT + ln_eps)
    y = d * rstd[None, :] * tl.load(lnw + feats)[:, None] + tl.load(lnb + feats)[:, None]
    return activation(y, ACT)


@triton.jit
def _block_stats(L: tl.constexpr, ht, xt, ot, trow, w1x, w1o, b1, wh, bh, HT, ln_eps,
                 HP: tl.constexpr, IN_PAD: tl.constexpr, SP: tl.constexpr, HAS_T: tl.constexpr,
                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Per-sample mean and 1 / std (biased, over the first HT features) of matrix M_L's
    pre-activations, computed block by block without keeping them: each block's mean and sum of
    squared deviations merged into the running ones (Chan, Golub, LeVeque), so no E[z^2] - E[z]^2
    cancellation."""
    offs_n = tl.arange(0, BN)
    mean = tl.zeros((BM,), tl.float32)
    m2 = tl.zeros((BM,), tl.float32)
    for n0 in range(0, HP, BN):
        rows = n0 + offs_n
        z = _pre(L, ht, xt, ot, trow, w1x, w1o, b1, wh, bh, rows, HP, IN_PAD, SP, HAS_T, PREC, BM, BN)
        ok = rows[:, None] < HT
        na = tl.minimum(n0, HT).to(tl.float32)  # features merged so far (blocks are contiguous)
        nb = tl.minimum(tl.maximum(HT - n0, 0), BN).to(tl.float32)
        bmean = tl.sum(tl.where(ok, z, 0.0), axis=0) / tl.maximum(nb, 1.0)
        d = tl.where(ok, z - bmean[None, :], 0.0)
        delta = bmean - mean
        tot = tl.maximum(na + nb, 1.0)
        mean = mean + delta * (nb / tot)
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (na * nb / tot)
    rstd = 1.0 / tl.sqrt(m2 / HT + ln_eps)
    return mean, rstd


@triton.jit
def mlp_eval(xin, ot, trow, w1x, w1o, b1, wh, bh, wo, bo, lnw, lnb, HT, ln_eps,
             HP: tl.constexpr, IN_PAD: tl.constexpr, SP: tl.constexpr, OUT_PAD: tl.constexpr,
             DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr, LN: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One network evaluation for a tile by layer pairing (see the module docstring):
    xin [BM, IN_PAD] float32, ot [SP, BM] (feature-major obs tile, compute dtype) -> [BM, OUT_PAD]
    float32.

    Layer 1 = W1x x + W1o obs + b1 (+ trow, the time share, when HAS_T). With LN every hidden
    layer is Linear -> LayerNorm(HT, eps, lnw[l], lnb[l]) -> activation.
    """
    offs_h = tl.arange(0, HP)
    offs_n = tl.arange(0, BN)
    offs_o = tl.arange(0, OUT_PAD)
    cdt: tl.constexpr = w1x.dtype.element_ty
    xt = tl.trans(xin.to(cdt))
    START: tl.constexpr = 1 - DEPTH % 2  # an odd number of matrices: layer 1 full width first
    ht = xt  # (the first pair's input when START = 0: unused, layer 1 reads xt / ot)
    if START == 1:
        z1 = _pre(0, xt, xt, ot, trow, w1x, w1o, b1, wh, bh, offs_h, HP, IN_PAD, SP, HAS_T, PREC, BM, HP)
        if LN:
            ht = _ln_act_full(z1, lnw, lnb, HT, ln_eps, HP, ACT).to(cdt)
        else:
            ht = activation(z1, ACT).to(cdt)
    out = tl.zeros((OUT_PAD, BM), tl.float32)
    for pi in tl.static_range((DEPTH + 1 - START) // 2):
        # the pair (P, Q) = (M_{START + 2 pi}, M_{START + 2 pi + 1}); written out inline so that every
        # index stays a compile-time constant (a local assigned in the loop would not be one)
        if LN:
            mean, rstd = _block_stats(START + 2 * pi, ht, xt, ot, trow, w1x, w1o, b1, wh, bh, HT, ln_eps, HP,
                                      IN_PAD, SP, HAS_T, PREC, BM, BN)
        if START + 2 * pi + 1 == DEPTH:
            acc = tl.zeros((OUT_PAD, BM), tl.float32) + tl.load(bo + offs_o)[:, None]
        else:
            acc = tl.zeros((HP, BM), tl.float32) + tl.load(bh + (START + 2 * pi) * HP + offs_h)[:, None]
        for n0 in range(0, HP, BN):
            rows = n0 + offs_n
            z = _pre(START + 2 * pi, ht, xt, ot, trow, w1x, w1o, b1, wh, bh, rows, HP, IN_PAD, SP, HAS_T, PREC,
                     BM, BN)
            if LN:
                z = (z - mean[None, :]) * rstd[None, :] * tl.load(lnw + (START + 2 * pi) * HP + rows)[:, None] \
                    + tl.load(lnb + (START + 2 * pi) * HP + rows)[:, None]
            blk = activation(z, ACT).to(cdt)
            if START + 2 * pi + 1 == DEPTH:
                wq = tl.load(wo + offs_o[:, None] * HP + rows[None, :])
            else:
                wq = tl.load(wh + (START + 2 * pi) * (HP * HP) + offs_h[:, None] * HP + rows[None, :])
            acc = dot(wq, blk, acc, PREC)
        if START + 2 * pi + 1 == DEPTH:
            out = acc
        else:
            if LN:
                ht = _ln_act_full(acc, lnw + (START + 2 * pi + 1) * HP, lnb + (START + 2 * pi + 1) * HP, HT,
                                  ln_eps, HP, ACT).to(cdt)
            else:
                ht = activation(acc, ACT).to(cdt)
    return tl.trans(out)


@triton.jit
def net_eval(xin, ot, trow, w1x, w1o, b1, wh, bh, wo, bo,
             HP: tl.constexpr, IN_PAD: tl.constexpr, SP: tl.constexpr, OUT_PAD: tl.constexpr,
             DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """The policy network (no LayerNorm)."""
    return mlp_eval(xin, ot, trow, w1x, w1o, b1, wh, bh, wo, bo, bh, bh, 1, 0.0,
                    HP, IN_PAD, SP, OUT_PAD, DEPTH, ACT, HAS_T, False, BM, BN, PREC)
