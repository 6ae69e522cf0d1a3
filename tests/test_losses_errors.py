"""Bad input: clear Python exceptions that name the argument; direct op calls raise, never crash."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import make_pair, randn, requires_cuda

import ffa

pytestmark = pytest.mark.torch_threads(1)

ops = torch.ops.ffa


def _pair(**kw):
    return make_pair(2, 3, 4, 5, 6, grad=(False, False), **kw)


def fa(s, t, **kw):
    return ffa.feature_affinity_loss(s, t, **kw)


def fast(s, t, **kw):
    return ffa.fast_feature_affinity_loss(s, t, **kw)


LOSSES = [pytest.param(fa, id="fa"), pytest.param(fast, id="ffa")]


@pytest.mark.parametrize("loss", LOSSES)
def test_not_4d(loss):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"student must be a 4-D"):
        loss(s[0], t)
    with pytest.raises(ValueError, match=r"teacher must be a 4-D"):
        loss(s, t.unsqueeze(0))
    with pytest.raises(ValueError, match=r"student must be a 4-D"):
        loss(s.flatten(2), t)


@pytest.mark.parametrize("loss", LOSSES)
def test_not_tensors(loss):
    s, t = _pair()
    with pytest.raises(TypeError, match=r"student must be a torch.Tensor"):
        loss(s.tolist(), t)
    with pytest.raises(TypeError, match=r"teacher must be a torch.Tensor"):
        loss(s, None)


@pytest.mark.parametrize("loss", LOSSES)
def test_batch_mismatch(loss):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"batch sizes differ: 2 vs 1"):
        loss(s, t[:1])


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_sized_dims(loss):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"student must have C, H, W > 0"):
        loss(s[:, :0], t)
    with pytest.raises(ValueError, match=r"teacher must have C, H, W > 0"):
        loss(s, t[:, :, :0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("loss", LOSSES)
def test_integer_dtypes(loss, dtype):
    s, t = _pair()
    with pytest.raises(TypeError, match=r"student must have a floating-point dtype"):
        loss(s.to(dtype), t)
    with pytest.raises(TypeError, match=r"teacher must have a floating-point dtype"):
        loss(s, t.to(dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("loss", LOSSES)
def test_complex_dtypes(loss, dtype):
    s, t = _pair()
    with pytest.raises(TypeError, match=r"student must have a floating-point dtype"):
        loss(s.to(dtype), t)
    with pytest.raises(TypeError, match=r"teacher must have a floating-point dtype"):
        loss(s, t.to(dtype))


@requires_cuda
@pytest.mark.parametrize("loss", LOSSES)
def test_different_devices(loss):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"same device"):
        loss(s, t.cuda())
    with pytest.raises(ValueError, match=r"same device"):
        loss(s.cuda(), t)


@requires_cuda
def test_projection_on_other_device():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"projection must be on"):
        fast(s, t, projection=randn((30, 4)).cuda())


@pytest.mark.parametrize("p", [0, 3, -1, 1.5, True, False, "1", None])
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_p(loss, p):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"p must be 1 or 2, got "):
        loss(s, t, p=p)


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_float_p(loss, p):
    """p=1.0 passes `p in (1, 2)` but the op's schema wants an int: it must still fail clearly."""
    s, t = _pair()
    with pytest.raises(ValueError, match=r"p must be 1 or 2, got "):
        loss(s, t, p=p)


@pytest.mark.parametrize(
    "eps", [0, 0.0, -1e-5, float("nan"), float("inf"), "1e-5", None, True], ids=str
)
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_eps(loss, eps):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"eps must be a positive finite number, got "):
        loss(s, t, eps=eps)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "elementwise_mean"])
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_reduction(loss, reduction):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        loss(s, t, reduction=reduction)


@pytest.mark.parametrize("k", [0, -3, 2.0, True, None, "15"])
def test_bad_k(k):
    s, t = _pair()
    with pytest.raises(ValueError, match=r"k must be a positive int, got "):
        fast(s, t, k=k)


@pytest.mark.parametrize(
    "shape",
    [(29, 4), (31, 4), (3, 30, 4), (2, 29, 4), (30,), (1, 1, 30, 4), (30, 0), (2, 30, 0)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bad_projection_shape(shape):
    s, t = _pair()  # B = 2, N = 30
    with pytest.raises(ValueError, match=r"projection must have shape \[N, k\] or \[B, N, k\]"):
        fast(s, t, projection=torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_bad_projection_dtype(dtype):
    s, t = _pair()
    with pytest.raises(TypeError, match=r"projection must have a floating-point dtype"):
        fast(s, t, projection=torch.zeros((30, 4), dtype=dtype))


def test_projection_not_a_tensor():
    s, t = _pair()
    with pytest.raises(TypeError, match=r"projection must be a torch.Tensor"):
        fast(s, t, projection=[[0.0] * 4] * 30)


def test_projection_checked_against_resized_student():
    """N is the student's H*W (the teacher is resized to it), not the teacher's."""
    s, t = make_pair(2, 3, 4, 5, 6, 7, 8, grad=(False, False))
    with pytest.raises(ValueError, match=r"N=30"):
        fast(s, t, projection=torch.zeros((56, 4)))
    fast(s, t, projection=torch.zeros((30, 4)))


# ---- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 3}, "p must be 1 or 2"),
        ({"p": True}, "p must be 1 or 2"),
        ({"p": 2.0}, "p must be 1 or 2"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"eps": 0}, "eps must be a positive finite number"),
        ({"eps": -1.0}, "eps must be a positive finite number"),
    ],
)
@pytest.mark.parametrize("cls", [ffa.FeatureAffinityLoss, ffa.FastFeatureAffinityLoss])
def test_module_constructors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be a positive int"),
        ({"k": -1}, "k must be a positive int"),
        ({"k": 1.5}, "k must be a positive int"),
        ({"k": True}, "k must be a positive int"),
        ({"seed": -1}, "seed must be a non-negative int or None"),
        ({"seed": 1.0}, "seed must be a non-negative int or None"),
        ({"seed": "0"}, "seed must be a non-negative int or None"),
        ({"seed": True}, "seed must be a non-negative int or None"),
        ({"seed": 2**64}, r"seed must be below 2\*\*64"),
    ],
)
def test_fast_module_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ffa.FastFeatureAffinityLoss(**kwargs)


def test_modules_check_inputs():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        ffa.FeatureAffinityLoss()(s, t[:1])
    with pytest.raises(ValueError, match=r"projection must have shape"):
        ffa.FastFeatureAffinityLoss(seed=0)(s, t, projection=torch.zeros(7, 3))


def test_module_repr():
    assert "p=2" in repr(ffa.FeatureAffinityLoss(p=2))
    r = repr(ffa.FastFeatureAffinityLoss(k=9, seed=5))
    assert "k=9" in r and "seed=5" in r


# ---- direct op calls: C++ TORCH_CHECKs raise RuntimeError, never crash ---------------------------


def _op_cases():
    s, t = _pair()
    z = randn((1, 30, 4))
    g = torch.ones(2)
    _, y, p_s, p_t = ops.ffa_loss(s, t, z, 1, 1e-5)
    m = [True, True]
    fa_l, fa_b = ops.fa_loss, ops.fa_loss_backward
    ffa_l, ffa_b = ops.ffa_loss, ops.ffa_loss_backward
    cases = {
        "student_3d": (fa_l, (s[0], t, 1, 1e-5), "student must be 4-D"),
        "teacher_5d": (fa_l, (s, t[None], 1, 1e-5), "teacher must be 4-D"),
        "batch": (fa_l, (s, t[:1], 1, 1e-5), "batch sizes differ"),
        "hw": (fa_l, (s, t[:, :, :4], 2, 1e-5), "share H,W"),
        "int": (fa_l, (s.long(), t.long(), 1, 1e-5), "floating"),
        "complex": (fa_l, (s.cfloat(), t.cfloat(), 1, 1e-5), "floating"),
        "dtype_mix": (fa_l, (s, t.double(), 1, 1e-5), "same dtype"),
        "p": (fa_l, (s, t, 3, 1e-5), "p must be 1 or 2"),
        "eps": (fa_l, (s, t, 1, 0.0), "eps must be positive"),
        "eps_inf": (fa_l, (s, t, 2, float("inf")), "eps must be positive and finite"),
        "eps_nan": (fa_b, (g, s, t, 1, float("nan"), m), "eps must be positive and finite"),
        "channels": (fa_l, (s[:, :0], t, 1, 1e-5), "channels must be positive"),
        "bwd_grad": (fa_b, (torch.ones(3), s, t, 1, 1e-5, m), "grad must have shape"),
        "bwd_grad_2d": (fa_b, (torch.ones(2, 1), s, t, 2, 1e-5, m), "grad must have shape"),
        "bwd_p": (fa_b, (g, s, t, 0, 1e-5, m), "p must be 1 or 2"),
        "ffa_z_2d": (ffa_l, (s, t, z[0], 1, 1e-5), "projection must be 3-D"),
        "ffa_z_n": (ffa_l, (s, t, z[:, :29], 1, 1e-5), "projection must have N=30"),
        "ffa_z_b": (ffa_l, (s, t, z.expand(3, 30, 4), 1, 1e-5), "projection batch"),
        "ffa_z_k": (ffa_l, (s, t, z[:, :, :0], 1, 1e-5), "k >= 1"),
        "ffa_z_dtype": (ffa_l, (s, t, z.double(), 1, 1e-5), "projection dtype"),
        "ffa_p": (ffa_l, (s, t, z, 5, 1e-5), "p must be 1 or 2"),
        "ffa_eps": (ffa_l, (s, t, z, 1, -1.0), "eps must be positive"),
        "ffa_eps_inf": (ffa_l, (s, t, z, 1, float("inf")), "eps must be positive and finite"),
        "ffa_hw": (ffa_l, (s, t[:, :, :, :5], z, 1, 1e-5), "share H,W"),
        "ffa_bwd_y": (ffa_b, (g, s, t, z, y[:, :29], p_s, p_t, 1, 1e-5, m), "y must be"),
        "ffa_bwd_ps": (ffa_b, (g, s, t, z, y, p_t, p_t, 1, 1e-5, m), "p_s must be"),
        "ffa_bwd_pt": (ffa_b, (g, s, t, z, y, p_s, p_s, 1, 1e-5, m), "p_t must be"),
        "ffa_bwd_y_dtype": (ffa_b, (g, s, t, z, y.double(), p_s, p_t, 1, 1e-5, m), "y must be"),
        "ffa_bwd_grad": (ffa_b, (g[:1], s, t, z, y, p_s, p_t, 1, 1e-5, m), "grad must have shape"),
    }
    return cases


OP_CASES = list(_op_cases())


@pytest.mark.parametrize("case", OP_CASES)
def test_direct_op_bad_input(case):
    op, args, match = _op_cases()[case]
    with pytest.raises(RuntimeError, match=match):
        op(*args)


def test_source_checkout_without_build_says_so(tmp_path):
    """An unbuilt source checkout that shadows the installed ffa is named as the cause."""
    from ffa._ops import _load_error

    (tmp_path / "ffa").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'ffa'\n")
    msg = _load_error(tmp_path / "ffa")
    assert "imported from its source checkout" in msg and "shadows the installed ffa" in msg
    assert "pip install --no-build-isolation -e ." in msg
    (tmp_path / "ffa" / "_C.abi3.so").write_text("")  # built, yet failing: a broken build
    assert "failed to load" in _load_error(tmp_path / "ffa")
