"""ffa inside torchdistill itself: registries, the AffinityLoss drop-in against torchdistill's own
implementation, a DistillationBox built from the example YAML, and the example end to end.

Skipped (with the reason) where torchdistill cannot be imported: it needs torch >= 2.12 and
torchvision >= 0.27 (pip install 'ffa[torchdistill]' scikit-learn).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import torchdistill  # noqa: F401
    from torchdistill.losses import mid_level as td_mid_level
    from torchdistill.losses.registry import (
        LOW_LEVEL_LOSS_DICT,
        MIDDLE_LEVEL_LOSS_DICT,
        get_mid_level_loss,
    )
    from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT
except Exception as e:  # ImportError, or a torchvision that does not load with this torch
    pytest.skip(
        f"torchdistill cannot be imported ({e!r}); the end-to-end tests need torchdistill>=1.1.5 "
        "(torch>=2.12, torchvision>=0.27)",
        allow_module_level=True,
    )

import ffa  # noqa: E402
import ffa.integrations.torchdistill as ffa_td  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "torchdistill"


def test_registered_keys():
    assert MIDDLE_LEVEL_LOSS_DICT["ffa.FALoss"] is ffa_td.FALoss
    assert MIDDLE_LEVEL_LOSS_DICT["ffa.AffinityLoss"] is ffa_td.AffinityLoss
    assert LOW_LEVEL_LOSS_DICT["ffa.FeatureAffinityLoss"] is ffa.FeatureAffinityLoss
    assert LOW_LEVEL_LOSS_DICT["ffa.FastFeatureAffinityLoss"] is ffa.FastFeatureAffinityLoss
    assert AUXILIARY_MODEL_WRAPPER_DICT["ffa.FAAdapters"] is ffa_td.FAAdapters
    # torchdistill's own AffinityLoss keeps its key.
    assert MIDDLE_LEVEL_LOSS_DICT["AffinityLoss"] is td_mid_level.AffinityLoss


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 8, 8), (3, 2, 6, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_affinity_dropin_matches_torchdistill_float64(shape, reduction):
    """Value and gradients of ffa.AffinityLoss vs torchdistill's AffinityLoss, in float64.

    torchdistill accumulates in torch.zeros(batch) (the default dtype), so the default dtype is
    float64 while its loss runs.
    """
    gen = torch.Generator().manual_seed(sum(shape))
    fs = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    ft = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    kwargs = dict(
        student_module_path="affinity_adapter",
        teacher_module_path="paraphraser.encoder",
        student_module_io="output",
        teacher_module_io="output",
        reduction=reduction,
    )
    s_io, t_io = {"affinity_adapter": {"output": fs}}, {"paraphraser.encoder": {"output": ft}}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = td_mid_level.AffinityLoss(**kwargs)(s_io, t_io, None)
    finally:
        torch.set_default_dtype(default)
    ours = get_mid_level_loss({"key": "ffa.AffinityLoss", "kwargs": kwargs})(s_io, t_io, None)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    g_ref = torch.autograd.grad(ref, (fs, ft))
    g_ours = torch.autograd.grad(ours, (fs, ft))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_affinity_dropin_matches_torchdistill_float32():
    gen = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 4, 12, 12, generator=gen)
    ft = torch.randn(2, 4, 12, 12, generator=gen)
    kwargs = dict(student_module_path="s", teacher_module_path="t")
    s_io, t_io = {"s": {"output": fs}}, {"t": {"output": ft}}
    ref = td_mid_level.AffinityLoss(**kwargs)(s_io, t_io)
    ours = ffa_td.AffinityLoss(**kwargs)(s_io, t_io)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def test_low_level_registration_in_simple_loss_wrapper():
    gen = torch.Generator().manual_seed(1)
    fs = torch.randn(2, 4, 6, 6, generator=gen)
    ft = torch.randn(2, 8, 12, 12, generator=gen)  # Cs != Ct, teacher at twice the resolution
    wrapper_config = {
        "key": "SimpleLossWrapper",
        "kwargs": {
            "input": {"is_from_teacher": False, "module_path": "layer1", "io": "output"},
            "target": {"is_from_teacher": True, "module_path": "layer1", "io": "output"},
        },
    }
    for key, kwargs, expected in (
        ("ffa.FeatureAffinityLoss", {"p": 1}, ffa.feature_affinity_loss(fs, ft)),
        (
            "ffa.FastFeatureAffinityLoss",
            {"k": 4, "seed": 9},
            ffa.fast_feature_affinity_loss(fs, ft, k=4, generator=torch.Generator().manual_seed(9)),
        ),
    ):
        loss = get_mid_level_loss({"key": key, "kwargs": kwargs}, wrapper_config)
        value = loss({"layer1": {"output": fs}}, {"layer1": {"output": ft}}, None)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)


def _load_run_module():
    spec = importlib.util.spec_from_file_location("ffa_td_example_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distillation_box_optimizes_the_adapters():
    """The example YAML in torchdistill's DistillationBox: the adapters are in the optimizer, get
    gradients from the FA term and move; the loss is finite."""
    pytest.importorskip("sklearn", reason="the example's data set comes from scikit-learn")
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.models.registry import get_model

    run = _load_run_module()
    config = run.load_config(EXAMPLE / "faqd_digits.yaml", 1)
    models = config["models"]
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    teacher = get_model(models["teacher_model"]["key"], **models["teacher_model"]["kwargs"])
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"])
    teacher.eval()
    box = get_distillation_box(
        teacher, student, config["datasets"], config["train"], cpu, None, False, 1
    )
    assert isinstance(box.student_model, ffa_td.FAAdapters)
    assert isinstance(box.criterion.term_dict["fa"][0], ffa_td.FALoss)
    adapters = list(box.student_model.adapter_dict.parameters())
    optimized = {id(p) for group in box.optimizer.param_groups for p in group["params"]}
    assert len(adapters) == 6 and all(id(p) in optimized for p in adapters)
    before = [p.detach().clone() for p in adapters]
    box.pre_epoch_process(epoch=0)
    for step, (x, y, supp) in enumerate(box.train_data_loader):
        loss = box.forward_process(x, y, supp)
        assert math.isfinite(loss.item())
        loss.backward(retain_graph=True)
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in adapters)
        box.optimizer.zero_grad()
        box.post_forward_process(loss=loss)
        if step == 2:
            break
    assert all(not torch.equal(a, b) for a, b in zip(before, adapters, strict=True))
    box.clean_modules()


def test_example_quick_end_to_end(tmp_path):
    """examples/torchdistill/run.py --quick through torchdistill's entry points; its last line
    is one JSON object."""
    pytest.importorskip("sklearn", reason="the example's data set comes from scikit-learn")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stderr[-2000:])
    print(proc.stdout.strip().splitlines()[-1])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("steps", "first_loss", "last_loss", "student_acc"):
        assert key in result
    assert result["steps"] > 0
    assert math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    assert result["last_loss"] < result["first_loss"]
    assert result["teacher_acc"] > 0.8
    assert result["student_acc"] > 0.5  # 10 classes: chance is 0.1
