"""FAQDLoss and FeatureHooks: parts against hand-written formulas, adapters, errors, hooks,
torch.compile, bf16 autocast, and a --quick run of the digits example."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffa
from ffa import FAQDLoss, FeatureHooks, reference

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _feats(b=3, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    s = [
        torch.randn(b, 4, 8, 8, generator=g, dtype=dtype),
        torch.randn(b, 6, 5, 3, generator=g, dtype=dtype),
    ]
    t = [
        torch.randn(b, 5, 16, 16, generator=g, dtype=dtype),  # another size: resized
        torch.randn(b, 3, 5, 3, generator=g, dtype=dtype),
    ]
    if grad:
        s = [x.requires_grad_() for x in s]
    return s, t


def _logits(b=3, c=10, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=dtype, requires_grad=True)
    t = 3 * torch.randn(b, c, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


# ---- parts against hand-written formulas -----------------------------------------------------
@pytest.mark.parametrize("kd", ["mse", "kl"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_parts_exact(kd, p, reduction):
    zs, zt, y = _logits()
    fs, ft = _feats()
    temp = 4.0
    fn = FAQDLoss(
        kd=kd,
        temperature=temp,
        kd_weight=0.7,
        fa_weight=0.3,
        label_weight=0.2,
        p=p,
        reduction=reduction,
    )
    out = fn(zs, zt, fs, ft, target=y)

    if kd == "mse":
        kd_ref = ((zs - zt) ** 2).sum() / zs.numel()
    else:  # T^2 * mean_b sum_c p_t (log p_t - log p_s)
        pt = torch.softmax(zt / temp, 1)
        kd_ref = (pt * (pt.log() - torch.log_softmax(zs / temp, 1))).sum() / zs.shape[0] * temp**2
    fa_ref = sum(
        reference.fa_loss(s, t, p=p, reduction=reduction) for s, t in zip(fs, ft, strict=True)
    )
    label_ref = -torch.log_softmax(zs, 1)[torch.arange(3), y].mean()
    torch.testing.assert_close(out.kd, kd_ref)
    torch.testing.assert_close(out.fa, fa_ref)
    torch.testing.assert_close(out.label, label_ref)
    torch.testing.assert_close(out.loss, 0.7 * kd_ref + 0.3 * fa_ref + 0.2 * label_ref)
    assert out.loss.dtype == torch.float64

    # gradients too
    g = torch.autograd.grad(out.loss, [zs, *fs])
    g_ref = torch.autograd.grad(0.7 * kd_ref + 0.3 * fa_ref + 0.2 * label_ref, [zs, *fs])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [1, 2])
def test_parts_fast_uses_module_generator(p):
    zs, zt, _ = _logits()
    fs, ft = _feats()
    fn = FAQDLoss(affinity="fast", k=7, p=p, seed=123)
    gen = fn.generator("cpu")
    replay = torch.Generator().manual_seed(0)
    replay.set_state(gen.get_state())
    out = fn(zs, zt, fs, ft)
    fa_ref = 0
    for s, t in zip(
        fs, ft, strict=True
    ):  # one fresh Z per layer, drawn in order from the module's generator
        n = s.shape[2] * s.shape[3]
        z = torch.randn((1, n, 7), generator=replay, dtype=torch.float64)
        fa_ref = fa_ref + reference.ffa_loss(s, t, z, p=p)
    torch.testing.assert_close(out.fa, fa_ref)
    # a second call draws fresh Z
    assert not torch.equal(fn(zs, zt, fs, ft).fa, out.fa)


def test_fast_seed_reproducible_and_global_rng_untouched():
    zs, zt, _ = _logits()
    fs, ft = _feats()
    state = torch.get_rng_state()
    a = FAQDLoss(affinity="fast", seed=5)(zs, zt, fs, ft).fa
    b = FAQDLoss(affinity="fast", seed=5)(zs, zt, fs, ft).fa
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = FAQDLoss(affinity="fast")(zs, zt, fs, ft).fa  # random seed per instance
    d = FAQDLoss(affinity="fast")(zs, zt, fs, ft).fa
    assert not torch.equal(c, d)


def test_teacher_is_constant():
    zs, zt, _ = _logits()
    fs, ft = _feats()
    zt.requires_grad_()
    ft = [t.requires_grad_() for t in ft]
    for affinity in ("exact", "fast"):
        out = FAQDLoss(kd="kl", affinity=affinity)(zs, zt, fs, ft)
        out.loss.backward()
        assert zt.grad is None and all(t.grad is None for t in ft)
        assert zs.grad is not None and all(s.grad is not None for s in fs)


def test_zero_weight_parts_are_logged_without_grad():
    zs, zt, y = _logits()
    fs, ft = _feats()
    fn = FAQDLoss(kd_weight=0.0, fa_weight=0.0, label_weight=1.0)
    out = fn(zs, zt, fs, ft, target=y)
    assert out.kd > 0 and out.fa > 0
    assert not out.kd.requires_grad and not out.fa.requires_grad
    torch.testing.assert_close(out.loss, out.label)
    # parts without inputs are 0; a teacher is not needed for labels only
    out = fn(zs, None, target=y)
    assert out.kd == 0 and out.fa == 0
    out.loss.backward()
    assert zs.grad is not None


# ---- adapters --------------------------------------------------------------------------------
def test_adapters_are_owned_trainable_and_applied():
    zs, zt, _ = _logits()
    fs, ft = _feats()
    fn = FAQDLoss(adapters=[4, None]).double()
    params = list(fn.parameters())
    assert [tuple(p.shape) for p in params] == [(4, 4, 1, 1), (4,)]
    assert all(p.requires_grad for p in params)
    out = fn(zs, zt, fs, ft)
    conv = fn.adapters[0][0]
    adapted = F.relu(F.conv2d(fs[0], conv.weight, conv.bias))
    fa_ref = reference.fa_loss(adapted, ft[0]) + reference.fa_loss(fs[1], ft[1])
    torch.testing.assert_close(out.fa, fa_ref)
    out.loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # an optimizer over the loss's parameters updates the adapter
    w0 = conv.weight.detach().clone()
    torch.optim.SGD(fn.parameters(), lr=1.0).step()
    assert not torch.equal(conv.weight, w0)
    assert "adapters.0.0.weight" in fn.state_dict()


# ---- errors ----------------------------------------------------------------------------------
def test_errors():
    zs, zt, _ = _logits()
    fs, ft = _feats()
    with pytest.raises(ValueError, match="label_weight"):
        FAQDLoss(label_weight=0.5)(zs, zt, fs, ft, target=None)
    with pytest.raises(ValueError, match="teacher_logits"):
        FAQDLoss()(zs, None, fs, ft)
    with pytest.raises(ValueError, match="student_feats"):
        FAQDLoss()(zs, zt)
    with pytest.raises(ValueError, match="kd must be"):
        FAQDLoss(kd="ce")
    with pytest.raises(ValueError, match="affinity must be"):
        FAQDLoss(affinity="approx")
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        FAQDLoss(p=3)
    with pytest.raises(ValueError, match="k must be"):
        FAQDLoss(k=0)
    with pytest.raises(ValueError, match="temperature"):
        FAQDLoss(temperature=0)
    with pytest.raises(ValueError, match="fa_weight"):
        FAQDLoss(fa_weight=-1)
    with pytest.raises(ValueError, match="reduction"):
        FAQDLoss(reduction="none")
    with pytest.raises(ValueError, match=r"adapters\[1\]"):
        FAQDLoss(adapters=[4, 0])
    with pytest.raises(TypeError, match="adapters"):
        FAQDLoss(adapters=4)
    with pytest.raises(ValueError, match="2 adapters but got 1 layers"):
        FAQDLoss(adapters=[4, 6])(zs, zt, fs[:1], ft[:1])
    with pytest.raises(ValueError, match="same number of layers"):
        FAQDLoss()(zs, zt, fs, ft[:1])
    with pytest.raises(ValueError, match="same shape"):
        FAQDLoss()(zs, zt[:, :5], fs, ft)


# ---- FeatureHooks ----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def test_feature_hooks_capture_and_remove():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 1, 8, 8)
    with FeatureHooks(net, ["layer2", "layer1"]) as hooks:
        with pytest.raises(RuntimeError, match="run a forward pass"):
            _ = hooks.features
        net(x)
        f2, f1 = hooks.features
        assert hooks["layer1"] is f1
        torch.testing.assert_close(f1, net.layer1(x))
        torch.testing.assert_close(f2, net.layer2(net.layer1(x)))
        assert f1.requires_grad  # outputs keep their graph
        assert len(net.layer1._forward_hooks) == 1
    assert len(net.layer1._forward_hooks) == 0 and len(net.layer2._forward_hooks) == 0
    hooks.remove()  # idempotent
    hooks.clear()
    with pytest.raises(RuntimeError):
        _ = hooks.features
    # nested names
    hooks = FeatureHooks(net, ["layer1.0"])
    net(x)
    assert hooks.features[0].shape == (2, 8, 8, 8)
    hooks.remove()
    assert len(net.layer1[0]._forward_hooks) == 0


def test_feature_hooks_errors():
    net = Net()
    with pytest.raises(ValueError, match="no submodule named 'layer9'.*'layer1'"):
        FeatureHooks(net, ["layer1", "layer9"])
    assert len(net.layer1._forward_hooks) == 0  # nothing registered on error
    with pytest.raises(ValueError, match="distinct"):
        FeatureHooks(net, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="at least one"):
        FeatureHooks(net, [])
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureHooks(object(), ["layer1"])


# ---- torch.compile and autocast --------------------------------------------------------------
def _setup(seed=0, device="cpu"):
    torch.manual_seed(seed)
    teacher, student = Net(c=12).to(device), Net(c=8).to(device)
    x = torch.randn(4, 1, 12, 12, device=device)
    with torch.no_grad(), FeatureHooks(teacher, ["layer1", "layer2"]) as th:
        zt = teacher(x)
        ft = th.features
    return student, x, zt, ft


@pytest.mark.parametrize("affinity", ["exact", "fast"])
def test_compiled_training_step_matches_eager(affinity):
    student, x, zt, ft = _setup()
    loss_fn = FAQDLoss(kd="kl", temperature=2.0, fa_weight=0.5, affinity=affinity, adapters=[8, 16])
    hooks = FeatureHooks(student, ["layer1", "layer2"])
    params = list(student.parameters()) + list(loss_fn.parameters())

    def step(x, zt, ft):
        zs = student(x)
        out = loss_fn(zs, zt, hooks.features, ft)
        out.loss.backward()
        return out

    gen = loss_fn.generator("cpu")
    state = gen.get_state()
    eager = step(x, zt, ft)
    g_eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    gen.set_state(state)  # same Z for the fast estimator
    torch._dynamo.reset()
    compiled = torch.compile(step)(x, zt, ft)
    g_comp = [p.grad for p in params]
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_eager, g_comp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    hooks.remove()


def test_compile_fullgraph_forward_exact():
    # student forward + FAQDLoss (exact FA, adapters, hooks) in one graph; FFA draws Z from a
    # torch.Generator, which dynamo cannot trace under fullgraph (it graph-breaks without it).
    student, x, zt, ft = _setup()
    loss_fn = FAQDLoss(kd="kl", fa_weight=0.5, label_weight=0.1, adapters=[8, 16])
    y = torch.arange(4)
    with FeatureHooks(student, ["layer1", "layer2"]) as hooks:

        def fwd(x, zt, ft, y):
            return loss_fn(student(x), zt, hooks.features, ft, target=y)

        eager = fwd(x, zt, ft, y)
        torch._dynamo.reset()
        compiled = torch.compile(fwd, fullgraph=True)(x, zt, ft, y)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


AUTOCAST = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA, reason="no GPU")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="no GPU")),
]


@pytest.mark.parametrize("affinity", ["exact", "fast"])
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_close_to_float32(affinity, device, dtype):
    # bf16 has an 8-bit mantissa (fp16 11): the convs and logits carry ~1e-2 relative error,
    # which the losses inherit (FA itself accumulates in float32). Stated tolerance: 5e-2
    # relative on each part.
    student, x, zt, ft = _setup(device=device)
    loss_fn = FAQDLoss(fa_weight=1.0, label_weight=1.0, affinity=affinity, seed=0)
    y = torch.arange(4, device=device)

    def run():
        with FeatureHooks(student, ["layer1", "layer2"]) as hooks:
            zs = student(x)
            loss_fn._generators.clear()  # same Z in both runs
            return loss_fn(zs, zt, hooks.features, ft, target=y)

    ref = run()
    with torch.autocast(device, dtype=dtype):
        low = run()
    assert low.loss.dtype == torch.float32
    for a, b in zip(low, ref, strict=True):
        assert torch.isfinite(a)
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-4)
    low.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


# ---- the example, quick ----------------------------------------------------------------------
def test_example_quick_learns():
    pytest.importorskip(
        "sklearn", reason="the digits example needs scikit-learn (extra 'examples')"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "faqd_digits.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ["teacher_acc", "labels_only_acc", "kd_acc", "kd_fa_acc", "kd_ffa_acc"]
    keys += [k.replace("_acc", "_w4a4_acc") for k in keys[1:]]
    for key in keys:
        assert math.isfinite(result[key]), key
        assert result[key] > 0.5, (key, result[key])  # chance is 0.1


def test_reexported():
    assert ffa.FAQDLoss is FAQDLoss and ffa.FeatureHooks is FeatureHooks
    assert "FAQDLoss" in ffa.__all__ and "FeatureHooks" in ffa.__all__
