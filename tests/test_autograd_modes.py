"""Every ffa op in every autograd mode: right against float64 torch-op oracles, or a clear error.

Modes: reverse (covered elsewhere), forward (torch.func.jvp / jacfwd, torch.autograd.forward_ad),
double backward (create_graph=True, hvp, gradgradcheck, gradient penalties), and the torch.func
transforms (grad, vjp, jacrev, functional_call + grad, vmap of grad). A mode an op cannot support
must raise; it must never return a zero tangent or a zero second derivative.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from loss_helpers import DEVICES, make_pair, randn

import ffa
from ffa import portable, reference
from ffa.quant import fake_quantize, quant_relu, quantize_weight

pytestmark = pytest.mark.torch_threads(1)
ops = torch.ops.ffa
EPS = 1e-5
F64 = torch.float64

# (kind, p): exact FA, FFA with an explicit projection, and the Philox op (the CUDA eager path).
LOSSES = [("fa", 1), ("fa", 2), ("ffa", 1), ("ffa", 2), ("philox", 1), ("philox", 2)]
LOSS_IDS = [f"{k}-p{p}" for k, p in LOSSES]
K, SEED, OFFSET = 4, 1234, 8


def _pair(device, dtype=F64, seed=0):
    return make_pair(2, 3, 4, 3, 5, dtype=dtype, device=device, seed=seed, grad=(False, False))


def _projection(s):
    """A fixed Z [N, K] (no RNG: it is also built inside vmap)."""
    n = s.shape[2] * s.shape[3]
    dtype = torch.float64 if s.dtype == F64 else torch.float32
    i = torch.arange(n * K, dtype=dtype, device=s.device).reshape(n, K)
    return 1.5 * torch.sin(0.7 * i + 0.3)


def _z(s):
    """The Z of the Philox op on this input, so that reference and op see the same probes."""
    return ops.philox_probes(s.cpu(), K, SEED, OFFSET).to(s.device)


def _ours(kind, p):
    def fa(s, t):
        return ffa.feature_affinity_loss(s, t, p=p, reduction="none")

    def fast(s, t):
        z = _projection(s)
        return ffa.fast_feature_affinity_loss(s, t, p=p, reduction="none", projection=z)

    def philox(s, t):
        return ops.ffa_loss_philox(s, t, K, p, EPS, SEED, OFFSET)[0]

    return {"fa": fa, "ffa": fast, "philox": philox}[kind]


def _ref(kind, p):
    def fa(s, t):
        return reference.fa_loss(s, t, p=p, reduction="none")

    def fast(s, t):
        return reference.ffa_loss(s, t, _projection(s), p=p, reduction="none")

    def philox(s, t):
        return reference.ffa_loss(s, t, _z(s), p=p, reduction="none")

    return {"fa": fa, "ffa": fast, "philox": philox}[kind]


# ---- forward mode --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "p"), LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_jvp_matches_reference(device, kind, p):
    s, t = _pair(device)
    ts, tt = randn(s.shape, dtype=F64, device=device, seed=3), randn(t.shape, dtype=F64, seed=4)
    tt = tt.to(device)
    for tangents in ((ts, tt), (ts, torch.zeros_like(tt))):
        out, tan = torch.func.jvp(_ours(kind, p), (s, t), tangents)
        ref_out, ref_tan = torch.func.jvp(_ref(kind, p), (s, t), tangents)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(tan, ref_tan, rtol=1e-9, atol=1e-14)
        assert tan.abs().min() > 0  # a real tangent, not a zero
    # torch.autograd.forward_ad (student only) and jacfwd against jacrev
    with fwAD.dual_level():
        out = _ours(kind, p)(fwAD.make_dual(s, ts), t)
        tan = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tan, torch.func.jvp(_ref(kind, p), (s, t), (ts, 0 * tt))[1])
    jf = torch.func.jacfwd(_ours(kind, p))(s, t)
    jr = torch.func.jacrev(_ref(kind, p))(s, t)
    torch.testing.assert_close(jf, jr, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_jvp_low_precision(dtype):
    """Tangents of float32/bfloat16 inputs come back in the loss dtype (float32)."""
    s, t = _pair("cpu", dtype)
    ts = randn(s.shape, dtype=dtype, seed=3)
    out, tan = torch.func.jvp(
        lambda a: ffa.feature_affinity_loss(a, t, reduction="none"), (s,), (ts,)
    )
    truth = torch.func.jvp(
        lambda a: reference.fa_loss(a, t.double(), reduction="none"), (s.double(),), (ts.double(),)
    )[1]
    assert tan.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tan.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())


def test_ffa_jvp_wrt_projection_raises():
    s, t = _pair("cpu")
    z = randn((15, K), dtype=F64, seed=5)
    with pytest.raises(NotImplementedError, match="ffa::ffa_loss: forward-mode AD .*projection"):
        torch.func.jvp(lambda zz: ops.ffa_loss(s, t, zz[None], 1, EPS)[0], (z,), (z,))


# ---- torch.func reverse transforms ---------------------------------------------------------------
@pytest.mark.parametrize(("kind", "p"), LOSSES, ids=LOSS_IDS)
def test_loss_torch_func_reverse(kind, p):
    s, t = _pair("cpu")
    ours, ref = _ours(kind, p), _ref(kind, p)

    def total(f):
        return lambda a, b: f(a, b).sum()

    g = torch.func.grad(total(ours), argnums=(0, 1))(s, t)
    torch.testing.assert_close(g, torch.func.grad(total(ref), argnums=(0, 1))(s, t))
    out, vjp_fn = torch.func.vjp(ours, s, t)
    ref_out, ref_vjp = torch.func.vjp(ref, s, t)
    v = torch.tensor([0.3, -1.2], dtype=F64)
    torch.testing.assert_close(vjp_fn(v), ref_vjp(v))
    torch.testing.assert_close(torch.func.jacrev(ours)(s, t), torch.func.jacrev(ref)(s, t))
    # per-sample gradients: vmap over the batch of grad of a batch-of-one loss
    per = torch.func.vmap(torch.func.grad(lambda a, b: ours(a[None], b[None]).sum()))(s, t)
    torch.testing.assert_close(per, g[0])


@pytest.mark.parametrize("kind", ["fa", "ffa", "philox"])
@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 1)], ids=str)
def test_vmap_folds_into_the_batch(kind, in_dims):
    """vmap of a loss (and of its gradient) equals the loop over the vmapped dimension."""
    v = 3
    s = randn((v, 2, 3, 3, 5), dtype=F64, seed=1)
    t = randn((v, 2, 4, 3, 5), dtype=F64, seed=2)
    s_in = s if in_dims[0] is not None else s[0]
    t_in = t.movedim(0, in_dims[1]) if in_dims[1] is not None else t[0]
    for p in (1, 2):
        f = _ours(kind, p)
        batched = torch.vmap(f, in_dims=in_dims)(s_in, t_in)
        grads = torch.vmap(
            torch.func.grad(lambda a, b, f=f: f(a, b).sum(), argnums=(0, 1)), in_dims=in_dims
        )(s_in, t_in)
        for i in range(v):
            a = s_in[i] if in_dims[0] is not None else s_in
            b = t_in.select(in_dims[1], i) if in_dims[1] is not None else t_in
            torch.testing.assert_close(batched[i], f(a, b))
            ga, gb = torch.func.grad(lambda x, y, f=f: f(x, y).sum(), argnums=(0, 1))(a, b)
            torch.testing.assert_close(grads[0][i], ga)
            torch.testing.assert_close(grads[1][i], gb)


def test_vmap_projection_batched():
    """A projection vmapped (or per-sample) is folded with the features; a shared one is kept."""
    v, s, t = 2, *_pair("cpu")
    zs = 1.5 * torch.sin(torch.arange(v * 15 * K, dtype=F64).reshape(v, 1, 15, K))
    batched = torch.vmap(lambda z: ops.ffa_loss(s, t, z, 1, EPS)[0])(zs)
    for i in range(v):
        torch.testing.assert_close(batched[i], ops.ffa_loss(s, t, zs[i], 1, EPS)[0])


def test_functional_call_grad():
    """torch.func.functional_call + grad through a module using the losses (a FAQD-style step)."""
    net = torch.nn.Conv2d(3, 3, 1).double()
    s, t = _pair("cpu")
    params = dict(net.named_parameters())

    def loss(prm, x):
        feat = torch.func.functional_call(net, prm, (x,))
        return ffa.feature_affinity_loss(feat, t) + ffa.feature_affinity_loss(feat, t, p=2)

    g = torch.func.grad(loss)(params, s)
    expected = torch.autograd.grad(loss(params, s), list(params.values()))
    for a, b in zip(g.values(), expected, strict=True):
        torch.testing.assert_close(a, b)


# ---- double backward -----------------------------------------------------------------------------
SMOOTH = [x for x in LOSSES if x != ("fa", 1)]


@pytest.mark.parametrize(("kind", "p"), SMOOTH, ids=[f"{k}-p{p}" for k, p in SMOOTH])
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_matches_reference(device, kind, p):
    s, t = _pair(device)
    v = (randn(s.shape, dtype=F64, seed=8).to(device), randn(t.shape, dtype=F64, seed=9).to(device))

    def total(f):
        return lambda a, b: f(a, b).sum()

    _, hv = torch.autograd.functional.hvp(total(_ours(kind, p)), (s, t), v)
    _, ref_hv = torch.autograd.functional.hvp(total(_ref(kind, p)), (s, t), v)
    for a, b in zip(hv, ref_hv, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
        assert a.abs().max() > 0
    # a gradient penalty, and the teacher frozen
    a = s.clone().requires_grad_()
    for f in (_ours(kind, p), _ref(kind, p)):
        (g,) = torch.autograd.grad(f(a, t).sum(), a, create_graph=True)
        (pen,) = torch.autograd.grad(g.square().sum(), a)
        if f is _ours:
            continue
        ours = pen
    torch.testing.assert_close(ours, pen, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("kind", "p"), SMOOTH, ids=[f"{k}-p{p}" for k, p in SMOOTH])
def test_gradgradcheck(kind, p):
    s, t = make_pair(2, 2, 3, 2, 3, dtype=F64, seed=21)
    f = _ours(kind, p)
    assert torch.autograd.gradgradcheck(f, (s, t), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_portable_matches_reference():
    """The torch-op losses the double backward differentiates are the same functions."""
    s, t = _pair("cpu")
    z = _projection(s)
    for p in (1, 2):
        torch.testing.assert_close(
            portable.ffa_loss(s, t, z[None], p, EPS),
            reference.ffa_loss(s, t, z, p=p, reduction="none"),
        )
    torch.testing.assert_close(
        portable.fa_loss(s, t, 2, EPS), reference.fa_loss(s, t, p=2, reduction="none")
    )
    wide = make_pair(2, 9, 8, 2, 2, dtype=F64, seed=3)  # N < Cs + Ct: the N x N form
    torch.testing.assert_close(
        portable.fa_loss(*wide, 2, EPS), reference.fa_loss(*wide, p=2, reduction="none")
    )


def test_fa_p1_double_backward_raises():
    s, t = make_pair(2, 3, 4, 3, 5, dtype=F64)
    (g,) = torch.autograd.grad(ffa.feature_affinity_loss(s, t), s, create_graph=True)
    with pytest.raises(
        RuntimeError, match="ffa::fa_loss_backward: the derivative .* not implemented"
    ):
        g.square().sum().backward()


@pytest.mark.parametrize(("kind", "p"), SMOOTH, ids=[f"{k}-p{p}" for k, p in SMOOTH])
def test_second_derivatives_under_torch_func(kind, p):
    """jacrev of jacrev, grad of grad, and per-sample grad of grad (vmap): all exact."""
    s, t = _pair("cpu")
    ours, ref = _ours(kind, p), _ref(kind, p)

    def total(f):
        return lambda a: f(a, t).sum()

    truth = torch.autograd.functional.hessian(total(ref), s)
    torch.testing.assert_close(
        torch.func.jacrev(torch.func.jacrev(total(ours)))(s), truth, rtol=1e-8, atol=1e-12
    )

    def penalty(f):
        return lambda a: torch.func.grad(total(f))(a).square().sum()

    torch.testing.assert_close(torch.func.grad(penalty(ours))(s), torch.func.grad(penalty(ref))(s))
    per = [
        torch.func.vmap(
            torch.func.grad(
                lambda a, b, f=f: (
                    torch.func.grad(lambda x: f(x[None], b[None]).sum())(a).square().sum()
                )
            )
        )(s, t)
        for f in (ours, ref)
    ]
    torch.testing.assert_close(*per)


def test_fa_p1_second_derivatives_raise():
    s, t = _pair("cpu")
    with pytest.raises(RuntimeError, match="ffa::fa_loss_backward: the derivative .* p=1"):
        torch.func.grad(
            lambda a: torch.func.grad(lambda x: ffa.feature_affinity_loss(x, t))(a).sum()
        )(s)


@pytest.mark.parametrize(("kind", "p"), LOSSES, ids=LOSS_IDS)
def test_forward_over_reverse_raises(kind, p):
    s, t = _pair("cpu")
    with pytest.raises(
        NotImplementedError, match="_backward: forward-mode AD .* reverse-over-reverse"
    ):
        torch.func.hessian(lambda a: _ours(kind, p)(a, t).sum())(s)


# ---- quantization ops ----------------------------------------------------------------------------
def _x(shape=(4, 6), seed=0, dtype=torch.float32):
    return randn(shape, dtype=dtype, seed=seed) * 0.6


def test_quantize_weight_jvp_is_straight_through():
    w = _x((4, 3, 2, 2))
    tw = _x((4, 3, 2, 2), seed=1)
    for per_channel in (False, True):
        _, tan = torch.func.jvp(
            lambda a, pc=per_channel: quantize_weight(a, 4, per_channel=pc), (w,), (tw,)
        )
        torch.testing.assert_close(tan, tw)
    jac = torch.func.jacfwd(lambda a: quantize_weight(a, 2))(w.flatten()[:5])
    torch.testing.assert_close(jac, torch.eye(5))


@pytest.mark.parametrize("ste", ["inplt", "idnty", "relu"])
def test_quant_relu_jvp_and_double_backward(ste):
    x = _x() * 3
    x[0, 0] = 0.0
    alpha = torch.tensor([0.25])
    tx = _x(seed=1)

    def f(a):
        return quant_relu(a, alpha, 2, ste=ste)

    _, tan = torch.func.jvp(f, (x,), (tx,))
    jac = torch.func.jacrev(f)(x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(tan.flatten(), jac @ tx.flatten())
    assert tan.abs().max() > 0
    # double backward: g = mask * f'(y) for L = sum(y^3); d/dx (g . v) = mask * 6 y mask v
    xr = x.clone().requires_grad_()
    y = f(xr)
    (g,) = torch.autograd.grad(y.pow(3).sum(), xr, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xr)
    mask = jac.diagonal().reshape(x.shape)
    torch.testing.assert_close(h, mask * 6 * y.detach() * mask)
    with pytest.raises(NotImplementedError, match="ffa::quant_relu: .* w.r.t. alpha"):
        torch.func.jvp(lambda a: quant_relu(x, a, 2), (alpha,), (torch.ones(1),))


def test_quant_relu_alpha_double_backward_raises():
    x = _x() * 3
    alpha = torch.tensor([0.25], requires_grad=True)
    (ga,) = torch.autograd.grad(quant_relu(x, alpha, 2).pow(3).sum(), alpha, create_graph=True)
    with pytest.raises(RuntimeError, match="quant_relu_backward: the derivative"):
        ga.backward()


@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quantize_jvp_and_double_backward_match_torch(axis):
    x = _x((5, 3)) * 2
    tx = _x((5, 3), seed=1)
    if axis is None:
        ours = lambda a: fake_quantize(a, 0.1, 1, -8, 7)  # noqa: E731
        theirs = lambda a: torch.fake_quantize_per_tensor_affine(a, 0.1, 1, -8, 7)  # noqa: E731
    else:
        sc, zp = torch.tensor([0.1, 0.05, 0.2]), torch.tensor([1, 0, -2], dtype=torch.int32)
        ours = lambda a: fake_quantize(a, sc, zp, -8, 7, axis=1)  # noqa: E731
        theirs = lambda a: torch.fake_quantize_per_channel_affine(a, sc, zp, 1, -8, 7)  # noqa: E731
    _, tan = torch.func.jvp(ours, (x,), (tx,))
    (vjp,) = torch.func.vjp(theirs, x)[1](tx)  # diagonal Jacobian: J t = J^T t
    torch.testing.assert_close(tan, vjp)
    hs = []
    for f in (ours, theirs):
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(xr).pow(3).sum(), xr, create_graph=True)
        hs.append(torch.autograd.grad(g.sum(), xr)[0])
    torch.testing.assert_close(hs[0], hs[1])
    assert hs[0].abs().max() > 0


def test_fake_quantize_learnable_modes():
    x = _x((5, 3)) * 2
    scale = torch.tensor([0.1], requires_grad=True)
    zp = torch.tensor([0.0], requires_grad=True)
    tx = _x((5, 3), seed=1)
    # x tangent: the same mask as torch's LSQ x-gradient
    _, tan = torch.func.jvp(
        lambda a: fake_quantize(a, scale.detach(), zp.detach(), -8, 7, learnable=True), (x,), (tx,)
    )
    theirs = torch._fake_quantize_learnable_per_tensor_affine(
        x.requires_grad_(), scale, zp, -8, 7, 1.0
    )
    (gx,) = torch.autograd.grad(theirs, x, tx)
    torch.testing.assert_close(tan, gx)
    with pytest.raises(NotImplementedError, match="ffa::fake_quantize: .* scale or zero_point"):
        torch.func.jvp(
            lambda s: fake_quantize(x.detach(), s, zp.detach(), -8, 7, learnable=True),
            (scale.detach(),),
            (torch.ones(1),),
        )
    (gs,) = torch.autograd.grad(
        fake_quantize(x, scale, zp, -8, 7, learnable=True).pow(3).sum(), scale, create_graph=True
    )
    with pytest.raises(RuntimeError, match="fake_quantize_backward: the derivative"):
        gs.backward()


def test_fake_quantize_non_learnable_refuses_qparams_requiring_grad():
    x = _x()
    with pytest.raises(RuntimeError, match="not differentiable with respect to scale"):
        fake_quantize(x, torch.tensor(0.1, requires_grad=True), 0, -8, 7)
    with torch.no_grad():
        fake_quantize(x, torch.tensor(0.1, requires_grad=True), 0, -8, 7)


def test_quant_torch_func_transforms():
    x = _x()
    alpha = torch.tensor([0.3])
    for f in (
        lambda a: quantize_weight(a, 4).pow(2).sum(),
        lambda a: quant_relu(a, alpha, 4).pow(2).sum(),
        lambda a: fake_quantize(a, 0.05, 0, -8, 7).pow(2).sum(),
    ):
        xr = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(f(xr), xr)
        torch.testing.assert_close(torch.func.grad(f)(x), expected)
        torch.testing.assert_close(torch.func.vjp(f, x)[1](torch.tensor(1.0))[0], expected)
        torch.testing.assert_close(torch.func.jacrev(f)(x), expected)


def test_quant_forward_over_reverse():
    """torch.func.hessian (jacfwd of jacrev) through every quantizer equals reverse-over-reverse
    (and torch's own op's Hessian for fake_quantize)."""
    x = _x((5,)) * 3
    alpha = torch.tensor([1.0])
    cases = [
        (lambda a: quant_relu(a, alpha, 2).pow(3).sum(), None),
        (lambda a: quantize_weight(a, 4).pow(3).sum(), None),
        (
            lambda a: fake_quantize(a, 0.1, 0, -8, 7).pow(3).sum(),
            lambda a: torch.fake_quantize_per_tensor_affine(a, 0.1, 0, -8, 7).pow(3).sum(),
        ),
    ]
    for f, theirs in cases:
        h = torch.func.hessian(f)(x)
        torch.testing.assert_close(h, torch.func.jacrev(torch.func.jacrev(f))(x))
        assert h.abs().max() > 0
        if theirs is not None:
            torch.testing.assert_close(h, torch.autograd.functional.hessian(theirs, x))


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, 1e20), (torch.float32, 1e-30), (F64, 1e-200), (F64, 1e200)]
)
def test_portable_is_scale_safe(dtype, scale):
    """The torch-op losses (the double backward's) hold at any input magnitude, like the kernels."""
    s, t = _pair("cpu")
    z = _projection(s)
    for p in (1, 2):
        got = portable.ffa_loss(
            (s * scale).to(dtype), (t * scale).to(dtype), z[None].to(dtype), p, EPS
        )
        want = reference.ffa_loss(s, t, z, p=p, reduction="none", eps=EPS / scale)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)
    got = portable.fa_loss((s * scale).to(dtype), (t * scale).to(dtype), 2, EPS)
    want = reference.fa_loss(s, t, p=2, reduction="none", eps=EPS / scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)
