"""FAQD through torchdistill: a 4-bit student distilled label-free on scikit-learn's digits.

Everything runs through torchdistill's own entry points, as its example scripts do: the YAML is
loaded with ``yaml_util.load_yaml_file``, its ``dependencies`` imported with
``import_dependencies`` (which registers ffa through ``ffa.integrations.torchdistill``), the models
come from torchdistill's model registry, and training runs in torchdistill's boxes
(``pre_epoch_process`` / ``forward_process`` / ``post_forward_process`` / ``post_epoch_process``):

  1. the float teacher, with labels: ``get_training_box`` on teacher.yaml (skipped when
     faqd_digits.yaml's teacher ``src_ckpt`` exists, or ``--teacher-ckpt`` points to a file);
  2. the 4-bit student, label-free: ``get_distillation_box`` on faqd_digits.yaml: KD (MSE on the
     logits) + ``ffa.FALoss`` on three feature maps through the trainable ``ffa.FAAdapters``.

    python examples/torchdistill/run.py            # 15 + 15 epochs, about a minute or two on a CPU
    python examples/torchdistill/run.py --quick    # a few epochs: under a minute on a CPU
    python examples/torchdistill/run.py --affinity fast   # FFA instead of exact FA

The last line printed is one JSON object: steps (student optimizer steps), first_loss and
last_loss (the student's total training loss at its first and last step), student_acc and
teacher_acc (test accuracy on the 360 held-out digits), seconds, and versions.
Needs torchdistill >= 1.1.5 (torch >= 2.12, torchvision >= 0.27) and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # td_digits: for the YAML's !import_call and its dependencies

import torch  # noqa: E402

try:
    import torchdistill
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies, load_ckpt, set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box
    from torchdistill.datasets.util import build_data_loader
    from torchdistill.models.registry import get_model
except ImportError as e:  # pragma: no cover
    raise SystemExit(
        "this example needs torchdistill >= 1.1.5 (torch >= 2.12, torchvision >= 0.27): "
        f"pip install 'ffa[torchdistill]' scikit-learn ({e!r})"
    ) from e


def load_config(path, epochs):
    config = yaml_util.load_yaml_file(str(path))
    import_dependencies(config.get("dependencies", None))
    if epochs is not None:
        train = config["train"]
        train["num_epochs"] = epochs
        scheduler = train.get("scheduler") or {}
        if scheduler.get("key") == "CosineAnnealingLR":
            scheduler["kwargs"]["T_max"] = epochs
    return config


def build_model(model_config, device):
    return get_model(model_config["key"], **(model_config.get("kwargs") or {})).to(device)


def run_box(box, device):
    """torchdistill's training loop (its examples' train_one_epoch); returns the step losses."""
    losses = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"the loss is {losses[-1]} at step {len(losses)}")
        box.post_epoch_process()
    box.clean_modules()
    return losses


@torch.no_grad()
def accuracy(model, config, device):
    loader_config = config["test"]["test_data_loader"]
    loader = build_data_loader(
        config["datasets"][loader_config["dataset_id"]], loader_config, distributed=False
    )
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total


def train_teacher(args, device, ckpt_path, log):
    config = load_config(args.teacher_config, args.teacher_epochs)
    model = build_model(config["models"]["model"], device)
    box = get_training_box(model, config["datasets"], config["train"], device, None, False, 1)
    t0 = time.perf_counter()
    losses = run_box(box, device)
    acc = accuracy(model, config, device)
    log(
        f"teacher: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, test accuracy "
        f"{acc:.4f} ({time.perf_counter() - t0:.1f} s)"
    )
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, ckpt_path)  # the format load_ckpt reads
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "faqd_digits.yaml")
    ap.add_argument("--teacher-config", type=Path, default=HERE / "teacher.yaml")
    ap.add_argument(
        "--teacher-ckpt",
        type=Path,
        default=None,
        help="teacher checkpoint: loaded when it exists, else written after training the teacher "
        "(default: the YAML's src_ckpt, else a temporary file)",
    )
    ap.add_argument("--quick", action="store_true", help="4 teacher + 3 student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="student epochs")
    ap.add_argument("--affinity", choices=["exact", "fast"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: this net's small convs gain little from threads)",
    )
    ap.add_argument("--verbose", action="store_true", help="torchdistill's INFO logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.teacher_epochs = args.teacher_epochs or 4
        args.epochs = args.epochs or 3

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    set_seed(args.seed)

    config = load_config(args.config, args.epochs)
    models = config["models"]
    if args.affinity is not None:
        fa = config["train"]["criterion"]["kwargs"]["sub_terms"]["fa"]["criterion"]["kwargs"]
        fa["affinity"] = args.affinity
    ckpt = args.teacher_ckpt or models["teacher_model"].get("src_ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(os.path.expanduser(str(ckpt))) if ckpt else Path(tmp) / "teacher.pt"
        teacher_acc = None
        if not ckpt.is_file():
            teacher_acc = train_teacher(args, device, ckpt, log)
        teacher = build_model(models["teacher_model"], device)
        load_ckpt(str(ckpt), model=teacher, strict=True)
    teacher.eval()  # fixed BN statistics while it teaches
    if teacher_acc is None:
        teacher_acc = accuracy(teacher, config, device)

    student = build_model(models["student_model"], device)
    box = get_distillation_box(
        teacher, student, config["datasets"], config["train"], device, None, False, 1
    )
    box.teacher_model.eval()
    t0 = time.perf_counter()
    losses = run_box(box, device)
    student_acc = accuracy(student, config, device)
    fa_kwargs = config["train"]["criterion"]["kwargs"]["sub_terms"]["fa"]["criterion"]["kwargs"]
    log(
        f"student ({models['student_model']['key']} {models['student_model']['kwargs']}, "
        f"label-free KD + {fa_kwargs['affinity']} FA): {len(losses)} steps, loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}, test accuracy {student_acc:.4f} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    result = {
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "student_acc": student_acc,
        "teacher_acc": teacher_acc,
        "affinity": fa_kwargs["affinity"],
        "seconds": round(time.perf_counter() - t_start, 2),
        "torch": torch.__version__,
        "torchdistill": getattr(torchdistill, "__version__", "unknown"),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
