"""FAQDLoss under DistributedDataParallel: 2 processes, gloo, CPU.

One DDP step (each rank on half of the batch) must give the gradients of one process on the whole
batch (exact FA, reduction "mean": DDP averages the per-rank gradients). FFA draws independent Z
per rank by default.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ffa import FAQDLoss, FeatureHooks

WORLD = 2
BATCH = 8
NAMES = ["layer1", "layer2"]


class Net(nn.Module):  # no BatchNorm: its batch statistics would differ per rank
    def __init__(self, c):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _problem():
    torch.manual_seed(0)
    teacher, student = Net(12), Net(8)
    loss_fn = FAQDLoss(kd="kl", temperature=2.0, fa_weight=1.0, adapters=[8, 16], seed=0)
    x = torch.randn(BATCH, 1, 10, 10)
    with torch.no_grad(), FeatureHooks(teacher, NAMES) as th:
        zt = teacher(x)
        ft = th.features
    return student, loss_fn, x, zt, ft


def _grads(student, loss_fn):
    return [p.grad.clone() for p in [*student.parameters(), *loss_fn.parameters()]]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        student, loss_fn, x, zt, ft = _problem()
        hooks = FeatureHooks(student, NAMES)
        ddp_student, ddp_loss = DDP(student), DDP(loss_fn)  # the adapters need averaging too
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        zs = ddp_student(x[part])
        out = ddp_loss(zs, zt[part], hooks.features, [f[part] for f in ft])
        out.loss.backward()
        grads = _grads(student, loss_fn)

        # FFA: identical inputs on both ranks; the per-rank seed gives each its own Z
        fast = {}
        for per_rank in (True, False):
            fn = FAQDLoss(affinity="fast", seed=0, seed_per_rank=per_rank)
            torch.manual_seed(1)  # the same student features on both ranks
            fs = [torch.relu(f[:2] + 0.5 * torch.randn(f[:2].shape)) for f in ft]
            v = fn(zt[:2], zt[:2], fs, [f[:2] for f in ft]).fa.reshape(1)
            gathered = [torch.zeros(1) for _ in range(WORLD)]
            dist.all_gather(gathered, v)
            fast[per_rank] = torch.cat(gathered)
        torch.save({"grads": grads, "fast": fast}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_step_equals_whole_batch_and_ffa_independent_per_rank():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    # one process, whole batch
    student, loss_fn, x, zt, ft = _problem()
    with FeatureHooks(student, NAMES) as hooks:
        out = loss_fn(student(x), zt, hooks.features, ft)
    out.loss.backward()
    expected = _grads(student, loss_fn)

    for r in range(WORLD):
        assert len(results[r]["grads"]) == len(expected)
        for got, want in zip(results[r]["grads"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    fast = results[0]["fast"]
    assert fast[True][0] != fast[True][1], "FFA drew the same Z on both ranks"
    assert fast[False][0] == fast[False][1], "seed_per_rank=False must share Z across ranks"
