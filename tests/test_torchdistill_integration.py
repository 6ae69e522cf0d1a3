"""The ffa side of the torchdistill integration, without torchdistill (runs in CI).

The mid-level FA loss is fed hand-built io_dicts (torchdistill's format: {module_path: {"input": x,
"output": y}}), the adapter wrapper is driven the way DistillationBox drives an auxiliary model
wrapper, and the AffinityLoss drop-in is checked against a transcription of torchdistill's formula
(torchdistill 1.1.5, losses/mid_level.py, AffinityLoss.forward). tests/test_torchdistill_e2e.py
runs the same pieces inside torchdistill when it is installed.
"""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffa
from ffa.integrations._torchdistill_core import (
    AffinityLoss,
    FAAdapters,
    FALoss,
    channel_affinity_loss,
)


def torchdistill_affinity(student, teacher, reduction="mean"):
    """torchdistill's AffinityLoss.forward, transcribed (a [B, N, N] product per channel).

    The accumulator is created in the inputs' dtype (torchdistill's torch.zeros uses the default
    dtype, float32 unless changed).
    """
    s, t = student.flatten(2), teacher.flatten(2)
    batch_size, ch_size, hw = s.shape
    s = s / s.norm(p=2, dim=2).unsqueeze(-1)
    t = t / t.norm(p=2, dim=2).unsqueeze(-1)
    total = torch.zeros(batch_size, dtype=s.dtype, device=s.device)
    for i in range(ch_size):
        total = total + (
            (
                torch.bmm(s[:, i].unsqueeze(2), s[:, i].unsqueeze(1))
                - torch.bmm(t[:, i].unsqueeze(2), t[:, i].unsqueeze(1))
            )
            / hw
        ).norm(p=2, dim=(1, 2))
    return total.mean() if reduction == "mean" else total.sum()


def _layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


# ---- AffinityLoss drop-in ----------------------------------------------------------------------
_LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize(
    ("shape", "layout"),
    [(s, lay) for s in [(2, 3, 5, 7), (1, 1, 4, 4), (3, 4, 6, 5)] for lay in _LAYOUTS]
    + [((2, 2, 9), "contiguous"), ((2, 3, 2, 3, 4), "contiguous")],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_channel_affinity_matches_torchdistill_formula_float64(shape, reduction, layout):
    gen = torch.Generator().manual_seed(sum(shape) + len(reduction))
    s0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    t0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    s = _layout(s0, layout).requires_grad_(True) if len(shape) == 4 else s0.requires_grad_(True)
    t = _layout(t0, layout).requires_grad_(True) if len(shape) == 4 else t0.requires_grad_(True)
    ours = channel_affinity_loss(s, t, reduction=reduction)
    ref = torchdistill_affinity(s, t, reduction)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (s, t))
    g_ref = torch.autograd.grad(ref, (s, t))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_channel_affinity_gradcheck():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: channel_affinity_loss(a, b), (s, t))


def test_channel_affinity_float32_close_student():
    """Late in distillation (student close to teacher) the closed form must not cancel.

    Against a float64 evaluation of the same float32 inputs, its float32 value is at most as far off
    as the materialized float32 formula (torchdistill's), and within 1e-4 relative.
    """
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 16, 16, generator=gen)
    t = s + 1e-3 * torch.randn(s.shape, generator=gen)
    truth = torchdistill_affinity(s.double(), t.double())
    ours = channel_affinity_loss(s, t)
    materialized = torchdistill_affinity(s, t)
    assert ours.dtype == torch.float32
    err_ours = abs(ours.double() - truth).item() / truth.item()
    err_mat = abs(materialized.double() - truth).item() / truth.item()
    assert err_ours <= max(2 * err_mat, 1e-6), (err_ours, err_mat)
    assert err_ours < 1e-4


def test_channel_affinity_float32_accuracy_at_48x48():
    """float32 inputs: within float32 rounding of the float64 value (torchdistill's float32 sum
    over N^2 = 5.3e6 entries is off by about 2e-4 relative here)."""
    gen = torch.Generator().manual_seed(48)
    s = torch.randn(2, 10, 48, 48, generator=gen)
    t = torch.randn(2, 10, 48, 48, generator=gen)
    truth = channel_affinity_loss(s.double(), t.double())  # == torchdistill's formula in float64
    err = abs(channel_affinity_loss(s, t).double() - truth).item() / truth.item()
    assert err < 2e-7, err


def test_channel_affinity_equal_inputs_and_zero_channels():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    value = channel_affinity_loss(x, x.detach().clone())
    (grad,) = torch.autograd.grad(value, x)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad) == 0  # as torchdistill's norm at 0
    # An all-zero channel: torchdistill gives NaN (0/0); here it is the zero vector.
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen)
    s[:, 1] = 0
    s.requires_grad_(True)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen)
    value = channel_affinity_loss(s, t)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isnan(torchdistill_affinity(s.detach(), t))
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # The zero channel contributes ||t t^T||_F / N = 1 / N per sample.
    keep = [0, 2]
    rest = channel_affinity_loss(s.detach()[:, keep], t[:, keep], reduction="sum")
    torch.testing.assert_close(
        channel_affinity_loss(s.detach(), t, reduction="sum"),
        rest + 2 / 16,
        rtol=1e-12,
        atol=0,
    )


def test_channel_affinity_dtypes():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.randn(2, 3, 4, 4, generator=gen)
    ref = torchdistill_affinity(s.double(), t.double())
    for dtype in (torch.float16, torch.bfloat16):
        out = channel_affinity_loss(s.to(dtype), t.to(dtype))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=0)
        x = s.to(dtype).requires_grad_(True)
        channel_affinity_loss(x, t.to(dtype)).backward()
        assert x.grad.dtype == dtype


def test_channel_affinity_memory_is_linear_in_pixels():
    """At 128 x 128 (N = 16384) torchdistill's formula needs 1 GiB per [N, N] float32 product;
    the closed form runs on a CPU in O(B C N)."""
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 128, 128, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 128, 128, generator=gen)
    value = channel_affinity_loss(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_channel_affinity_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        channel_affinity_loss(x, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        channel_affinity_loss(x, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        channel_affinity_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="3-D"):
        channel_affinity_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="floating"):
        channel_affinity_loss(x.long(), x.long())


def test_affinity_loss_module_reads_io_dicts():
    gen = torch.Generator().manual_seed(5)
    fs = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen)
    ft = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen)
    loss = AffinityLoss(
        student_module_path="affinity_adapter",
        teacher_module_path="paraphraser.encoder",
        reduction="sum",
    )
    value = loss({"affinity_adapter": {"output": fs}}, {"paraphraser.encoder": {"output": ft}})
    torch.testing.assert_close(value, torchdistill_affinity(fs, ft, "sum"), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="forward_hook"):
        loss({}, {"paraphraser.encoder": {"output": ft}})
    with pytest.raises(ValueError, match="reduction"):
        AffinityLoss("a", "b", reduction="batchmean")


# ---- FALoss ------------------------------------------------------------------------------------
def _pairs(weights=(1.0, 0.5)):
    return {
        "pair1": {
            "student": {"path": "layer1", "io": "output"},
            "teacher": {"path": "layer1", "io": "output"},
            "weight": weights[0],
        },
        "pair2": {
            "student": {"path": "layer2", "io": "output"},
            "teacher": {"path": "block.2", "io": "input"},
            "weight": weights[1],
        },
    }


def _io_dicts(dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(7)
    # Cs != Ct and a teacher of another resolution on pair2.
    s1 = torch.randn(2, 4, 6, 6, dtype=dtype, generator=gen, requires_grad=requires_grad)
    s2 = torch.randn(2, 8, 3, 3, dtype=dtype, generator=gen, requires_grad=requires_grad)
    t1 = torch.randn(2, 4, 6, 6, dtype=dtype, generator=gen)
    t2 = torch.randn(2, 16, 5, 4, dtype=dtype, generator=gen)
    student = {
        ".": {"output": torch.zeros(2, 10)},
        "layer1": {"output": s1},
        "layer2": {"output": s2},
    }
    teacher = {"layer1": {"output": t1}, "block.2": {"input": t2}}
    return student, teacher


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_faloss_exact_is_weighted_sum(p, reduction):
    student, teacher = _io_dicts()
    loss = FALoss(_pairs(), affinity="exact", p=p, reduction=reduction)
    value = loss(student, teacher, torch.arange(2))  # targets: ignored (label-free)
    s1, s2 = student["layer1"]["output"], student["layer2"]["output"]
    t1, t2 = teacher["layer1"]["output"], teacher["block.2"]["input"]
    expected = ffa.feature_affinity_loss(
        s1, t1, p=p, reduction=reduction
    ) + 0.5 * ffa.feature_affinity_loss(s2, t2, p=p, reduction=reduction)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    assert s1.grad is not None and s2.grad is not None
    assert torch.count_nonzero(s1.grad) > 0 and torch.count_nonzero(s2.grad) > 0
    parts = loss.pair_losses(student, teacher)
    assert set(parts) == {"pair1", "pair2"}


def test_faloss_detaches_teacher():
    student, teacher = _io_dicts()
    t1 = teacher["layer1"]["output"].requires_grad_(True)
    FALoss(_pairs()).forward(student, teacher).backward()
    assert t1.grad is None
    FALoss(_pairs(), detach_teacher=False).forward(student, teacher).backward()
    assert t1.grad is not None


def test_faloss_fast_seeded_and_global_rng_untouched():
    student, teacher = _io_dicts(requires_grad=False)
    state = torch.get_rng_state()
    a = FALoss(_pairs(), affinity="fast", k=8, seed=123)
    b = FALoss(_pairs(), affinity="fast", k=8, seed=123)
    first = [a(student, teacher), a(student, teacher)]
    second = [b(student, teacher), b(student, teacher)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])  # a fresh Z on every call
    # The same Z as FastFeatureAffinityLoss with the same seed (the pairs draw in order).
    gen = torch.Generator().manual_seed(123)
    s1, s2 = student["layer1"]["output"], student["layer2"]["output"]
    t1, t2 = teacher["layer1"]["output"], teacher["block.2"]["input"]
    expected = ffa.fast_feature_affinity_loss(
        s1, t1, k=8, generator=gen
    ) + 0.5 * ffa.fast_feature_affinity_loss(s2, t2, k=8, generator=gen)
    torch.testing.assert_close(first[0], expected, rtol=1e-12, atol=0)


def test_faloss_seed_per_rank(monkeypatch):
    student, teacher = _io_dicts(requires_grad=False)
    values = {}
    for rank in (0, 1):
        monkeypatch.setattr(ffa.distill, "_dist_rank", lambda rank=rank: rank)
        values[rank] = FALoss(_pairs(), affinity="fast", seed=5)(student, teacher)
        values[rank, "shared"] = FALoss(_pairs(), affinity="fast", seed=5, seed_per_rank=False)(
            student, teacher
        )
    assert not torch.equal(values[0], values[1])
    assert torch.equal(values[0, "shared"], values[1, "shared"])
    assert torch.equal(values[0], values[0, "shared"])  # rank 0 keeps the plain seed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"affinity": "approx"}, "affinity"),
        ({"p": 3}, "p must be 1 or 2"),
        ({"k": 0}, "k must be"),
        ({"reduction": "none"}, "reduction"),
        ({"seed": -1}, "seed"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_faloss_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FALoss(_pairs(), **kwargs)


def test_faloss_config_errors():
    with pytest.raises(ValueError, match="non-empty"):
        FALoss({})
    bad = _pairs()
    del bad["pair1"]["teacher"]
    with pytest.raises(ValueError, match=r"pair1.*'teacher'"):
        FALoss(bad)
    bad = _pairs()
    bad["pair1"]["wieght"] = 1
    with pytest.raises(ValueError, match="unknown keys"):
        FALoss(bad)
    bad = _pairs((-1.0, 1.0))
    with pytest.raises(ValueError, match="weight"):
        FALoss(bad)
    bad = _pairs()
    bad["pair2"]["student"] = {"io": "output"}
    with pytest.raises(ValueError, match="path"):
        FALoss(bad)
    with pytest.raises(TypeError):
        FALoss(_pairs(), affinty="fast")  # a typo is not swallowed


def test_faloss_missing_io_is_named():
    student, teacher = _io_dicts()
    loss = FALoss(_pairs())
    del teacher["block.2"]
    with pytest.raises(ValueError, match=r"teacher io_dict has no module path 'block.2'.*forward"):
        loss(student, teacher)
    student, teacher = _io_dicts()
    teacher["block.2"] = {"output": teacher["block.2"]["input"]}
    with pytest.raises(ValueError, match=r"no 'input' for 'block.2'"):
        loss(student, teacher)


# ---- FAAdapters --------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _hook(model, paths, io_dict):
    modules = dict(model.named_modules())
    for path in paths:

        def hook(module, args, output, path=path):
            io_dict[path] = {"output": output}

        modules[path].register_forward_hook(hook)


def test_adapters_train_through_the_fa_loss():
    """Drives FAAdapters as DistillationBox does: forward, hooks, secondary_forward, criterion,
    an optimizer over the wrapper's parameters (torchdistill optimizes the wrapped student)."""
    torch.manual_seed(0)
    student, teacher = TinyNet(4), TinyNet(6)
    wrapper = FAAdapters(
        student_model=student,
        adapters={
            "a1": {"path": "student_model.layer1", "io": "output", "in_channels": 4},
            "a2": {"path": "student_model.layer2", "in_channels": 8, "out_channels": 12},
        },
        device=torch.device("cpu"),
        device_ids=None,
        distributed=False,
    )
    adapter_params = {id(p) for p in wrapper.adapter_dict.parameters()}
    assert len(adapter_params) == 4  # two 1x1 convs with bias
    assert adapter_params <= {id(p) for p in wrapper.parameters()}
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    loss_fn = FALoss(
        {
            "p1": {
                "student": {"path": "adapter_dict.a1", "io": "output"},
                "teacher": {"path": "layer1", "io": "output"},
            },
            "p2": {
                "student": {"path": "adapter_dict.a2", "io": "output"},
                "teacher": {"path": "layer2", "io": "output"},
            },
        }
    )
    s_io, t_io = {}, {}
    _hook(wrapper, ["student_model.layer1", "student_model.layer2"], s_io)
    _hook(teacher, ["layer1", "layer2"], t_io)
    x = torch.randn(4, 1, 8, 8)
    before = [p.detach().clone() for p in wrapper.adapter_dict.parameters()]
    losses = []
    for _ in range(3):
        with torch.no_grad():
            t_out = teacher(x)
        s_out = wrapper(x)
        s_io["."], t_io["."] = {"output": s_out}, {"output": t_out}
        wrapper.secondary_forward(s_io)
        assert s_io["adapter_dict.a2"]["output"].shape == (4, 12, 4, 4)
        loss = loss_fn(s_io, t_io, None)
        opt.zero_grad()
        loss.backward()
        for p in wrapper.adapter_dict.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0
        opt.step()
        losses.append(loss.item())
    after = list(wrapper.adapter_dict.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert losses[-1] < losses[0]
    torch.testing.assert_close(wrapper(x), student(x))  # forward is the student's


def test_adapters_relu_bias_options_and_errors():
    net = TinyNet()
    w = FAAdapters(
        student_model=net,
        adapters={
            "a": {"path": "student_model.layer1", "in_channels": 4, "relu": False, "bias": False}
        },
    )
    (layer,) = w.adapter_dict["a"]
    assert isinstance(layer, nn.Conv2d) and layer.bias is None
    with pytest.raises(ValueError, match="in_channels"):
        FAAdapters(student_model=net, adapters={"a": {"path": "student_model.layer1"}})
    with pytest.raises(ValueError, match="unknown keys"):
        FAAdapters(student_model=net, adapters={"a": {"path": "x", "in_channels": 4, "kernel": 3}})
    with pytest.raises(ValueError, match="without '.'"):
        FAAdapters(student_model=net, adapters={"a.b": {"path": "x", "in_channels": 4}})
    with pytest.raises(ValueError, match="student"):
        FAAdapters(teacher_model=net, adapters={"a": {"path": "x", "in_channels": 4}})
    with pytest.raises(ValueError, match="non-empty"):
        FAAdapters(student_model=net, adapters={})
    w = FAAdapters(
        student_model=net, adapters={"a": {"path": "student_model.layer9", "in_channels": 4}}
    )
    with pytest.raises(ValueError, match="forward_hook"):
        w.secondary_forward({"student_model.layer1": {"output": torch.zeros(1, 4, 2, 2)}})


# ---- the registration module without torchdistill ----------------------------------------------
class _BrokenTorchdistill:
    """A meta-path finder under which importing torchdistill fails as a torchvision built for
    another torch makes it fail (a RuntimeError, not an ImportError)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchdistill" or name.startswith("torchdistill."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_import_without_torchdistill_names_the_fix(monkeypatch, how):
    for name in [n for n in sys.modules if n == "torchdistill" or n.startswith("torchdistill.")]:
        monkeypatch.delitem(sys.modules, name)
    if how == "missing":
        monkeypatch.setitem(sys.modules, "torchdistill", None)  # import torchdistill -> ImportError
    else:
        monkeypatch.setattr(sys, "meta_path", [_BrokenTorchdistill(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "ffa.integrations.torchdistill", raising=False)
    with pytest.raises(ImportError, match=r"needs torchdistill.*pip install") as info:
        importlib.import_module("ffa.integrations.torchdistill")
    if how == "broken":
        assert "torchvision::nms" in str(info.value)
    monkeypatch.delitem(sys.modules, "ffa.integrations.torchdistill", raising=False)


def test_faloss_matches_faqd_fa_term():
    """FALoss on adapted features is FAQDLoss's FA term (same adapters, same reduction)."""
    student, teacher = _io_dicts(dtype=torch.float32)
    s = [student["layer1"]["output"], student["layer2"]["output"]]
    t = [teacher["layer1"]["output"], teacher["block.2"]["input"]]
    faqd = ffa.FAQDLoss(kd_weight=0.0, fa_weight=1.0)
    out = faqd(torch.zeros(2, 3), None, s, t)
    value = FALoss(_pairs((1.0, 1.0)))(student, teacher)
    torch.testing.assert_close(value, out.fa, rtol=1e-6, atol=0)
    assert F.mse_loss(value, out.loss).item() < 1e-12
