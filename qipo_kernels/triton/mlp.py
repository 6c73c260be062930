"""The MLP-evaluation building blocks of the fused samplers, as @triton.jit helpers.

Stable names, importable by other kernels (``from qipo_kernels.triton.mlp import mlp_eval``):

    stable_tanh(z)                      tanh without overflow
    activation(x, ACT)                  ACT = ACT_CODES[name]: mish, silu, relu, gelu (tanh approx.), tanh
    dot(a, b, acc, PREC)                acc + a @ b; PREC = PREC_IEEE (float32 IEEE), PREC_TF32,
                                        PREC_HALF (bf16 / fp16 inputs), PREC_TF32X3 (float32 inputs on
                                        tensor cores with ~float32 accuracy); float32 accumulation
    obs_share(obs_ptr, state, valid, S, w1o, b1, osh, HP, SP, BM, BN, BKS, PREC)
                                        osh [BM, HP] float32 = obs[state] @ W1_obs + b1 (layer 1's obs part)
    layernorm_act(buf, rowsum, lnw, lnb, HT, eps, HP, BM, BN, ACT)
                                        in place on buf [BM, HP]: LayerNorm over HT columns, affine, act
    mlp_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo, lnw, lnb, HT, eps, HP, HS, IN_PAD, OUT_PAD,
             DEPTH, ACT, HAS_T, LN, BM, BN, BK, PREC)
                                        one network evaluation of a tile: xin [BM, IN_PAD] float32 ->
                                        [BM, OUT_PAD] float32 (packed weights: see sampler_pack)
    net_eval(...)                       mlp_eval without LayerNorm (the policy network)

The packed weight layout these read (w1x [IN_PAD, HP], w1o [SP, HP], b1 [HP], wh [D-1, HP, HP],
bh [D-1, HP], wo [HP, OUT_PAD], bo [OUT_PAD], all zero-padded, weights transposed to [in, out]) is
built by qipo_kernels.triton.sampler_pack._mlp_tensors.
"""
import triton
import triton.language as tl

ACT_CODES = {"mish": 0, "silu": 1, "relu": 2, "gelu": 3, "tanh": 4}
PREC_IEEE, PREC_TF32, PREC_HALF, PREC_TF32X3 = 0, 1, 2, 3


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
def dot(a, b, acc, PREC: tl.constexpr):
    # PREC: 0 IEEE float32 (FMA), 1 TF32, 2 half inputs (bf16 / fp16), 3 TF32x3 (float32 inputs split
    # in a TF32 high and low part, three tensor-core products: ~float32 accuracy); float32 accumulation
    if PREC == 0:
        r = tl.dot(a, b, acc, input_precision="ieee")
    elif PREC == 1:
        r = tl.dot(a, b, acc, input_precision="tf32")
    elif PREC == 3:
        r = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def obs_share(obs_ptr, state, valid, S, w1o, b1, osh,
               HP: tl.constexpr, SP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BKS: tl.constexpr, PREC: tl.constexpr):
    """osh[m, :] = W1_obs @ obs[state[m]] + b1 (float32 scratch [BM, HP])."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_s = tl.arange(0, BKS)
    cdt = w1o.dtype.element_ty
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        acc = tl.zeros((BM, BN), tl.float32) + tl.load(b1 + cols)[None, :]
        for s0 in range(0, SP, BKS):
            ss = s0 + offs_s
            o = tl.load(obs_ptr + state[:, None] * S + ss[None, :],
                        mask=valid[:, None] & (ss[None, :] < S), other=0.0)
            w = tl.load(w1o + ss[:, None] * HP + cols[None, :])
            acc = dot(o.to(cdt), w, acc, PREC)
        tl.store(osh + offs_m[:, None] * HP + cols[None, :], acc)
    tl.debug_barrier()


@triton.jit
def layernorm_act(buf, rowsum, lnw, lnb, HT, ln_eps, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            ACT: tl.constexpr):
    """In place on buf [BM, HP] (pre-activations): LayerNorm over the first HT columns (biased
    variance, two passes), affine, activation. Padded columns stay 0 (gamma = beta = 0 there)."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    mean = rowsum / HT
    var = tl.zeros((BM,), tl.float32)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        v = tl.load(buf + offs_m[:, None] * HP + cols[None, :]).to(tl.float32)
        d = tl.where(cols[None, :] < HT, v - mean[:, None], 0.0)
        var += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(var / HT + ln_eps)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        ptrs = buf + offs_m[:, None] * HP + cols[None, :]
        v = tl.load(ptrs).to(tl.float32)
        y = (v - mean[:, None]) * rstd[:, None] * tl.load(lnw + cols)[None, :] + tl.load(lnb + cols)[None, :]
        tl.store(ptrs, activation(y, ACT).to(buf.dtype.element_ty))
    tl.debug_barrier()


@triton.jit
def mlp_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo, lnw, lnb, HT, ln_eps,
              HP: tl.constexpr, HS: tl.constexpr, IN_PAD: tl.constexpr, OUT_PAD: tl.constexpr,
              DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr, LN: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One network evaluation for a tile: xin [BM, IN_PAD] float32 -> [BM, OUT_PAD] float32.

    Layer 1 = osh (obs share + b1) + trow (time share, when HAS_T) + xin @ W1x; hidden layers
    and the output layer read their input from the scratch ``hbuf`` ([2, BM, HS] ping-pong).
    With LN, every hidden layer is Linear -> LayerNorm(HT, eps, lnw[l], lnb[l]) -> activation.
    """
    offs_m = tl.arange(0, BM)
    offs_i = tl.arange(0, IN_PAD)
    offs_o = tl.arange(0, OUT_PAD)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    cdt = w1x.dtype.element_ty
    xa = xin.to(cdt)
    rs = tl.zeros((BM,), tl.float32)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        acc = tl.load(osh + offs_m[:, None] * HP + cols[None, :])
        if HAS_T:
            acc += tl.load(trow + cols)[None, :]
        w = tl.load(w1x + offs_i[:, None] * HP + cols[None, :])
        acc = dot(xa, w, acc, PREC)
        if LN:
            acc = acc.to(cdt)
            rs += tl.sum(acc.to(tl.float32), axis=1)
        else:
            acc = activation(acc, ACT).to(cdt)
        tl.store(hbuf + offs_m[:, None] * HP + cols[None, :], acc)
    tl.debug_barrier()
    if LN:
        layernorm_act(hbuf, rs, lnw, lnb, HT, ln_eps, HP, BM, BN, ACT)
    for l in range(DEPTH - 1):
        src = hbuf + (l % 2) * (BM * HS)
        dst = hbuf + ((l + 1) % 2) * (BM * HS)
        rs = tl.zeros((BM,), tl.float32)
        for n0 in range(0, HP, BN):
            cols = n0 + offs_n
            acc = tl.zeros((BM, BN), tl.float32) + tl.load(bh + l * HP + cols)[None, :]
            for k0 in range(0, HP, BK):
                ks = k0 + offs_k
                a = tl.load(src + offs_m[:, None] * HP + ks[None, :])
                w = tl.load(wh + l * (HP * HP) + ks[:, None] * HP + cols[None, :])
                acc = dot(a, w, acc, PREC)
            if LN:
                acc = acc.to(cdt)
                rs += tl.sum(acc.to(tl.float32), axis=1)
            else:
                acc = activation(acc, ACT).to(cdt)
            tl.store(dst + offs_m[:, None] * HP + cols[None, :], acc)
        tl.debug_barrier()
        if LN:
            layernorm_act(dst, rs, lnw + (l + 1) * HP, lnb + (l + 1) * HP, HT, ln_eps, HP, BM, BN, ACT)
    src = hbuf + ((DEPTH - 1) % 2) * (BM * HS)
    out = tl.zeros((BM, OUT_PAD), tl.float32) + tl.load(bo + offs_o)[None, :]
    for k0 in range(0, HP, BK):
        ks = k0 + offs_k
        a = tl.load(src + offs_m[:, None] * HP + ks[None, :])
        w = tl.load(wo + ks[:, None] * OUT_PAD + offs_o[None, :])
        out = dot(a, w, out, PREC)
    tl.debug_barrier()
    return out


@triton.jit
def net_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo,
              HP: tl.constexpr, HS: tl.constexpr, IN_PAD: tl.constexpr, OUT_PAD: tl.constexpr,
              DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The policy network (no LayerNorm)."""
    return mlp_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo, bh, bh, 1, 0.0,
                     HP, HS, IN_PAD, OUT_PAD, DEPTH, ACT, HAS_T, False, BM, BN, BK, PREC)

