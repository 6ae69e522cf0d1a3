"""The torchdistill pieces under DistributedDataParallel: 2 processes, gloo, CPU, no torchdistill.

FAAdapters wraps the student and each adapter in DDP (as torchdistill wraps its connectors); one
DDP step with FALoss (exact, reduction "mean"), each rank on half of the batch, must give the
gradients of one process on the whole batch, adapters included. FALoss's FFA draws its own Z on
each rank (seed_per_rank=True), the same Z on every rank with seed_per_rank=False.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ffa.integrations._torchdistill_core import FAAdapters, FALoss

WORLD = 2
BATCH = 8
PAIRS = {
    name: {
        "student": {"path": f"adapter_dict.{name}", "io": "output"},
        "teacher": {"path": name, "io": "output"},
    }
    for name in ("layer1", "layer2")
}


class Net(nn.Module):  # no BatchNorm: its batch statistics would differ per rank
    def __init__(self, c):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _problem(distributed):
    torch.manual_seed(0)
    teacher, student = Net(12), Net(8)
    wrapper = FAAdapters(
        student_model=student,
        adapters={
            "layer1": {"path": "student_model.layer1", "in_channels": 8},
            "layer2": {"path": "student_model.layer2", "in_channels": 16},
        },
        device=torch.device("cpu"),
        distributed=distributed,
    )
    x = torch.randn(BATCH, 1, 10, 10)
    t_io = {}
    with torch.no_grad():
        h = teacher.layer1(x)
        t_io["layer1"] = {"output": h}
        t_io["layer2"] = {"output": teacher.layer2(h)}
    return student, wrapper, x, t_io


def _step(student, wrapper, x, t_io):
    """What DistillationBox does: forward, hooked student features, secondary_forward, loss."""
    s_io = {}
    handles = [
        getattr(student, name).register_forward_hook(
            lambda m, a, out, name=name: s_io.__setitem__(f"student_model.{name}", {"output": out})
        )
        for name in ("layer1", "layer2")
    ]
    logits = wrapper(x)
    wrapper.secondary_forward(s_io)
    for h in handles:
        h.remove()
    # + a logit term (a stand-in for KD) so that DDP sees every student parameter used
    (FALoss(PAIRS)(s_io, t_io) + logits.square().mean()).backward()
    adapters = [p for a in wrapper.adapter_dict.values() for p in a.parameters()]
    return [p.grad.clone() for p in [*student.parameters(), *adapters]]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        student, wrapper, x, t_io = _problem(distributed=True)
        assert isinstance(wrapper.student_model, nn.parallel.DistributedDataParallel)
        assert all(
            isinstance(a, nn.parallel.DistributedDataParallel)
            for a in wrapper.adapter_dict.values()
        )
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        t_part = {k: {"output": v["output"][part]} for k, v in t_io.items()}
        grads = _step(student, wrapper, x[part], t_part)

        fast = {}
        for per_rank in (True, False):
            fn = FALoss(PAIRS, affinity="fast", seed=0, seed_per_rank=per_rank)
            torch.manual_seed(1)  # the same student features on both ranks
            s_io = {
                f"adapter_dict.{k}": {
                    "output": torch.relu(v["output"] + torch.randn(v["output"].shape))
                }
                for k, v in t_io.items()
            }
            v = fn(s_io, t_io).reshape(1)
            gathered = [torch.zeros(1) for _ in range(WORLD)]
            dist.all_gather(gathered, v)
            fast[per_rank] = torch.cat(gathered)
        torch.save({"grads": grads, "fast": fast}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_adapters_ddp_step_equals_whole_batch_and_ffa_seeded_per_rank():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    expected = _step(*_problem(distributed=False))  # one process, whole batch
    for r in range(WORLD):
        assert len(results[r]["grads"]) == len(expected)
        for got, want in zip(results[r]["grads"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    fast = results[0]["fast"]
    assert fast[True][0] != fast[True][1], "FFA drew the same Z on both ranks"
    assert fast[False][0] == fast[False][1], "seed_per_rank=False must share Z across ranks"
