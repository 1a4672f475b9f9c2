"""Two gloo CPU processes on loopback, each seeing half of the calibration batches: the all-reduced layer Grams
(plain and sequential) and the Fisher (blocks: all-reduced sums and counts; woodbury: all-gathered per-sample
gradients) equal what one process computes on all batches."""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from obs_plugins.curvature import Curvature
from obs_plugins.curvature.fisher import collect_fisher
from tiny import Block

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.proj = nn.Linear(12, 6)
        self.layers = nn.ModuleList(Block(6) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.proj(torch.relu(self.conv(x)).flatten(1))
        for blk in self.layers:
            h = blk(h)
        return self.head(h)


def loss_fn(out, target):
    return nn.functional.cross_entropy(out, target)


def problem():
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(4)]
    return model, batches


def compute(model, batches) -> dict:
    out = {}
    params = [(model.conv, "weight"), (model.proj, "weight"), (model.head, "weight")]
    curv = Curvature.layerwise(model, params, batches, loss_fn=loss_fn, progress=False)
    out.update({f"H/{k}": v for k, v in curv.hessians.items()})
    out.update({f"n/{k}": torch.tensor(v) for k, v in curv.counts.items()})
    seq = Curvature.layerwise(model, [(b.fc, "weight") for b in model.layers], batches, sequential=True,
                              progress=False)
    out.update({f"Hseq/{k}": v for k, v in seq.hessians.items()})
    for mode in ("blocks", "woodbury"):
        collect_fisher(curv, block_size=16, mode=mode, progress=False)
        for k, f in curv.fisher.items():
            out[f"F-{mode}/{k}"] = f.dense_blocks()
            out[f"Finvdiag-{mode}/{k}"] = f.inverse_diag()
            out[f"Fn-{mode}/{k}"] = torch.tensor(f.n)
    return out


def _worker(rank: int, port: int, outdir: str):
    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    model, batches = problem()
    share = len(batches) // WORLD
    res = compute(model, batches[rank * share:(rank + 1) * share])
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    # Tear down only once both ranks are done: a rank that destroys its group (or exits) while the other still
    # talks to it can abort the other's gloo threads ("terminate called without an active exception", seen once
    # in CI-like runs). On an error the rank just exits; the parent reports it and kills the other.
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    single = compute(*problem())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for k, ref in single.items():
            v = got[k]
            if k.startswith(("n/", "Fn-")):
                assert int(v) == int(ref), k
                continue
            err = float((v.double() - ref.double()).norm() / ref.double().norm())
            # statistics to 1e-6; the damped inverse of a rank-deficient fp32 block amplifies their rounding
            # by about 1 / rel_damp
            assert err < (1e-4 if k.startswith("Finvdiag") else 1e-6), (rank, k, err)
    assert int(single["n/conv.weight"]) == 12 * 4  # 4 batches x 3 images x 2x2 output positions
    assert int(single["Fn-woodbury/proj.weight"]) == 12
