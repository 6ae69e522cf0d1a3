"""Label-free FAQD on real data: scikit-learn's handwritten digits, on a CPU, in minutes.

A full-precision CNN teacher is trained with labels. Students of the same architecture, quantized
with ffa.quant (4-bit weights "w4", and 4-bit weights + 4-bit activations "w4a4"), are then
trained from scratch under the same seeds, data order, augmentation and budget by:

  (a) labels only            cross-entropy, no teacher
  (b) KD                     label-free: MSE between student and teacher logits
  (c) KD + FA (exact)        label-free: + feature affinity on three feature maps (ffa kernels)
  (d) KD + FFA               label-free: + the fast randomized FA estimator (k=15 probes)

The FA terms follow the paper's released code: a trainable 1x1 conv + ReLU adapter on each student
feature map and fa_coef = 0.1 on the batch-summed FA loss (here: reduction "mean" with
fa_weight = 0.1 * batch size, the same objective). Test accuracy is taken after the last epoch.

Data: 1,797 real 8x8 digit images bundled with scikit-learn (no download), a fixed stratified
80/20 split, upsampled bilinearly to 32x32 so that the feature maps (16x16, 8x8, 4x4) are worth
matching; random translations of up to 3 pixels in training.

    python examples/faqd_digits.py                   # one seed, < 5 minutes on 2 CPU cores
    python examples/faqd_digits.py --seeds 0 1 2     # mean +- std over seeds
    python examples/faqd_digits.py --quick           # seconds: a smoke test
    python examples/faqd_digits.py --ddp 2           # 2 processes (gloo); or under torchrun:
    torchrun --nproc-per-node 2 examples/faqd_digits.py

The last line printed is one JSON object: teacher_acc, labels_only_acc, kd_acc, kd_fa_acc,
kd_ffa_acc and the *_w4a4_acc variants (means over the seeds; the per-seed values, spreads and
timings are under "runs", "std" and "seconds").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ffa
from ffa import FAQDLoss, FeatureHooks

try:
    from ffa.quant import quantize_model
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"this example needs ffa.quant: {e}") from e

FEATURES = ["layer1", "layer2", "layer3"]
METHODS = ["labels_only", "kd", "kd_fa", "kd_ffa"]
METHOD_NAMES = {
    "labels_only": "(a) labels only",
    "kd": "(b) KD, label-free",
    "kd_fa": "(c) KD+FA exact, label-free",
    "kd_ffa": "(d) KD+FFA, label-free",
}


# ---- data -----------------------------------------------------------------------------------
def load_digits_32(size=32):
    """Returns (x_train, y_train, x_test, y_test): [n, 1, size, size] float32, standardized."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(
            "this example needs scikit-learn: pip install 'ffa[examples]' (or scikit-learn)"
        ) from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=0.2, stratify=digits.target, random_state=0
    )
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def augment(x, gen, max_shift=3):
    """Random integer translations per image (background padding), drawn from ``gen``."""
    b, c, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1, 1, 1), generator=gen)
    rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(b, c, h, pad.shape[3])
    cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(b, c, h, w)
    return pad.gather(2, rows).gather(3, cols)


# ---- model ----------------------------------------------------------------------------------
def block(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    """32x32 -> stem (32x32) -> layer1 (16x16) -> layer2 (8x8) -> layer3 (4x4) -> mean -> fc.

    Each layer is conv3x3 (stride 2 to go down) - BN - ReLU, with its own ReLU module (so that
    quantize_model gives each its own QuantReLU for w4a4). Strided convs, not max-pooling: pooling
    is the slowest op of such a small net on a CPU.
    """

    def __init__(self, width=16, classes=10):
        super().__init__()
        w = width
        self.stem = block(1, w, 1)
        self.layer1 = block(w, w, 2)
        self.layer2 = block(w, 2 * w, 2)
        self.layer3 = block(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, classes)
        self.channels = [w, 2 * w, 4 * w]  # of the FEATURES maps

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def make_student(width, seed, a_bits):
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    # As the paper's code: every conv quantized (4-bit weights), the classifier kept in float.
    return quantize_model(model, w_bits=4, a_bits=a_bits, skip=("fc",))


# ---- distributed ----------------------------------------------------------------------------
def world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(module):
    """DDP when distributed (CPU: gloo) and the module has parameters."""
    if world()[1] > 1 and any(p.requires_grad for p in module.parameters()):
        return nn.parallel.DistributedDataParallel(module)
    return module


# ---- training -------------------------------------------------------------------------------
def batches(n, batch, gen):
    """Shuffled global batches, each sharded over the ranks (same composition for any world)."""
    rank, size = world()
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n - batch + 1, batch):  # drop the last partial batch: equal rank shares
        yield perm[i : i + batch].tensor_split(size)[rank]


@torch.no_grad()
def accuracy(model, x, y, bs=512):
    was_training = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(y), bs)
    )
    model.train(was_training)
    return correct / len(y)


def train(model, data, args, seed, *, loss_fn, teacher=None, epochs):
    """SGD (momentum 0.9, nesterov, cosine) over ``epochs``; returns the trained model."""
    x_train, y_train = data[0], data[1]
    gen = torch.Generator().manual_seed(1000 + seed)  # data order + augmentation: same per seed
    params = [*model.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(y_train) // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net, crit = wrap(model), wrap(loss_fn)
    need_feats = loss_fn.fa_weight > 0
    s_hooks = FeatureHooks(model, FEATURES) if need_feats else None
    t_hooks = FeatureHooks(teacher, FEATURES) if (teacher is not None and need_feats) else None
    model.train()
    for _ in range(epochs):
        for idx in batches(len(y_train), args.batch, gen):
            x = augment(x_train[idx], gen)
            zt = ft = fs = None
            if teacher is not None:
                with torch.no_grad():
                    zt = teacher(x)
                ft = t_hooks.features if t_hooks else None
            zs = net(x)
            fs = s_hooks.features if s_hooks else None
            y = y_train[idx] if loss_fn.label_weight > 0 else None  # label-free: never seen
            out = crit(zs, zt, fs, ft, target=y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            nn.utils.clip_grad_norm_(params, 20.0)  # as the released code
            opt.step()
            sched.step()
    for h in (s_hooks, t_hooks):
        if h is not None:
            h.remove()
    return model


def student_loss(method, args, seed):
    fa_weight = 0.1 * args.batch  # the released fa_coef 0.1 on a batch-summed FA loss
    if method == "labels_only":
        return FAQDLoss(kd_weight=0.0, fa_weight=0.0, label_weight=1.0)
    if method == "kd":
        return FAQDLoss(kd="mse", fa_weight=0.0)
    return FAQDLoss(
        kd="mse",
        fa_weight=fa_weight,
        affinity="exact" if method == "kd_fa" else "fast",
        k=15,
        adapters=DigitsCNN(args.width).channels,
        seed=seed,
    )


def run_seed(seed, data, args, log):
    x_test, y_test = data[2], data[3]
    results, seconds = {}, {}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    teacher = DigitsCNN(args.width)
    train(
        teacher,
        data,
        args,
        seed,
        epochs=args.teacher_epochs,
        loss_fn=FAQDLoss(kd_weight=0.0, fa_weight=0.0, label_weight=1.0),
    )
    teacher.eval()  # fixed BN statistics while it teaches
    for p in teacher.parameters():
        p.requires_grad_(False)
    results["teacher"] = accuracy(teacher, x_test, y_test)
    seconds["teacher"] = time.perf_counter() - t0
    log(f"seed {seed}: teacher {results['teacher']:.4f} ({seconds['teacher']:.1f} s)")
    for a_bits, suffix in ((None, ""), (4, "_w4a4")):
        for method in METHODS:
            key = method + suffix
            t0 = time.perf_counter()
            student = make_student(args.width, seed, a_bits)
            loss_fn = student_loss(method, args, seed)
            train(
                student,
                data,
                args,
                seed,
                loss_fn=loss_fn,
                teacher=None if method == "labels_only" else teacher,
                epochs=args.student_epochs,
            )
            results[key] = accuracy(student, x_test, y_test)
            seconds[key] = time.perf_counter() - t0
            log(f"seed {seed}: {key:<18} {results[key]:.4f} ({seconds[key]:.1f} s)")
    return results, seconds


def summarize(all_results, all_seconds, args, wall):
    keys = ["teacher"] + [m + s for s in ("", "_w4a4") for m in METHODS]

    def stats(vals):
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return mean, std

    rows = []
    n = len(all_results)
    header = f"{'model':<34}{'test accuracy':>22}{'train s':>10}"
    rows.append(header)
    rows.append("-" * len(header))
    for key in keys:
        mean, std = stats([r[key] for r in all_results])
        secs = statistics.fmean([s[key] for s in all_seconds])
        if key == "teacher":
            name = "teacher (float, labels)"
        else:
            variant = "w4a4" if key.endswith("_w4a4") else "w4"
            name = f"{variant:<6}{METHOD_NAMES[key.removesuffix('_w4a4')]}"
        acc = f"{100 * mean:6.2f}" + (f" +- {100 * std:4.2f} %" if n > 1 else " %")
        rows.append(f"{name:<34}{acc:>22}{secs:>10.1f}")
    print("\n".join(rows))
    print(
        f"seeds {args.seeds}; {n} seed(s); teacher {args.teacher_epochs} epochs, students "
        f"{args.student_epochs} epochs, width {args.width}, batch {args.batch}, lr {args.lr}; "
        f"world {world()[1]}; "
        f"wall {wall:.0f} s; torch {torch.__version__}, ffa {ffa.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    summary = {}
    for key in keys:
        summary[f"{key}_acc"] = stats([r[key] for r in all_results])[0]
    summary["std"] = {f"{k}_acc": stats([r[k] for r in all_results])[1] for k in keys}
    summary["seconds"] = {k: statistics.fmean([s[k] for s in all_seconds]) for k in keys}
    summary["runs"] = [{f"{k}_acc": r[k] for k in keys} for r in all_results]
    summary["seeds"] = args.seeds
    summary["wall_seconds"] = wall
    return summary


def main_worker(args):
    rank, size = world()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    torch.set_num_threads(args.threads)
    if args.batch % size:
        raise SystemExit(f"--batch {args.batch} must be divisible by the world size {size}")
    data = load_digits_32()
    log(f"digits: {len(data[1])} train / {len(data[3])} test images, 32x32; world size {size}")
    t0 = time.perf_counter()
    all_results, all_seconds = [], []
    for seed in args.seeds:
        r, s = run_seed(seed, data, args, log)
        all_results.append(r)
        all_seconds.append(s)
    wall = time.perf_counter() - t0
    if rank == 0:
        summary = summarize(all_results, all_seconds, args, wall)
        print(json.dumps(summary))
        sys.stdout.flush()


def _spawned(rank, size, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        main_worker(args)
    finally:
        dist.destroy_process_group()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: this net's small convs gain little from "
        "threads, and OpenMP threads on a busy machine can run several times slower)",
    )
    ap.add_argument("--width", type=int, default=None, help="channels of the first layer")
    ap.add_argument("--quick", action="store_true", help="a few epochs: a smoke test (seconds)")
    ap.add_argument(
        "--ddp",
        type=int,
        default=0,
        metavar="N",
        help="spawn N processes (gloo); torchrun sets this up by itself",
    )
    args = ap.parse_args(argv)
    if args.width is None:
        args.width = 8 if args.quick else 16
    if args.teacher_epochs is None:
        args.teacher_epochs = 4 if args.quick else 15
    if args.student_epochs is None:
        args.student_epochs = 3 if args.quick else 15
    return args


def main(argv=None):
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun
        dist.init_process_group("gloo")
        try:
            main_worker(args)
        finally:
            dist.destroy_process_group()
    elif args.ddp > 1:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "init")
            mp.spawn(_spawned, args=(args.ddp, init_file, args), nprocs=args.ddp, join=True)
    else:
        main_worker(args)


if __name__ == "__main__":
    main()
