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

from obs_plugins import OBSIHTConfig, api
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


def _join_group(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _leave_group(res: dict, outdir: str, rank: int) -> None:
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    # Tear down only once both ranks are done: a rank that destroys its group (or exits) while the other still
    # talks to it can abort the other's gloo threads ("terminate called without an active exception", seen once
    # in CI-like runs). On an error the rank just exits; the parent reports it and kills the other.
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, port: int, outdir: str):
    _join_group(rank, port)
    model, batches = problem()
    share = len(batches) // WORLD
    _leave_group(compute(model, batches[rank * share:(rank + 1) * share]), outdir, rank)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_single_process(tmp_path):
    results = _spawn(_worker, tmp_path)
    single = compute(*problem())
    for got in results:
        assert got.keys() == single.keys()
        for k, ref in single.items():
            v = got[k]
            if k.startswith(("n/", "Fn-")):
                assert int(v) == int(ref), k
                continue
            err = float((v.double() - ref.double()).norm() / ref.double().norm())
            # statistics to 1e-6; the damped inverse of a rank-deficient fp32 block amplifies their rounding
            # by about 1 / rel_damp
            assert err < (1e-4 if k.startswith("Finvdiag") else 1e-6), (k, err)
    assert int(single["n/conv.weight"]) == 12 * 4  # 4 batches x 3 images x 2x2 output positions
    assert int(single["Fn-woodbury/proj.weight"]) == 12


# ---- loss, gradient, HVP, output sensitivity and plans over uneven splits (fifteenth session: they were
# computed per process, so a global-allocation plan differed from rank to rank)
SIZES = (3, 5, 2, 4)          # batch sizes; rank 0 gets the first three batches, rank 1 the last
SPLITS = ((0, 1, 2), (3,))


def stats_problem():
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in SIZES]
    return model, batches


def stats(model, batches) -> dict:
    from obs_plugins import OBSIHTConfig, api
    params = [(model.conv, "weight"), (model.proj, "weight"), (model.head, "weight")]
    curv = Curvature.layerwise(model, params, batches, loss_fn=loss_fn, sequential=False, progress=False)
    out = {"loss": torch.tensor(curv.loss(), dtype=torch.float64)}
    loss, grads = curv.loss_and_grad()
    out["loss2"] = torch.tensor(loss, dtype=torch.float64)
    out.update({f"g/{k}": v for k, v in grads.items()})
    g = torch.Generator().manual_seed(5)
    vec = {t.key: torch.randn(t.current().shape, generator=g) for t in curv.targets}
    out.update({f"hvp/{k}": v for k, v in curv.hvp(vec).items()})
    for per_sample in (False, True):
        out.update({f"s{int(per_sample)}/{k}": v for k, v in curv.output_sensitivity(per_sample=per_sample).items()})
    plan = api.plan(OBSIHTConfig(allocation="global", progress=False), curvature=curv, amount=0.6)
    out.update({f"mask/{k}": e.mask for k, e in plan.entries.items()})
    out.update({f"w/{k}": e.new_weight for k, e in plan.entries.items()})
    return out


def _stats_worker(rank: int, port: int, outdir: str, splits):
    _join_group(rank, port)
    model, batches = stats_problem()
    mine = [batches[i] for i in splits[rank]]
    try:
        res = stats(model, mine)
    except Exception as e:   # noqa: BLE001 -- the parent checks which error each rank got
        res = {"error": f"{type(e).__name__}: {e}"}
    _leave_group(res, outdir, rank)


def _spawn(worker, tmp_path, *args):
    import torch.multiprocessing as mp
    ctx = mp.spawn(worker, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_loss_gradient_hvp_sensitivity_and_a_global_plan_over_uneven_splits(tmp_path):
    got = _spawn(_stats_worker, tmp_path, SPLITS)
    single = stats(*stats_problem())
    for res in got:
        assert "error" not in res, res.get("error")
        for k, ref in single.items():
            v = res[k]
            if k.startswith("mask/"):
                assert torch.equal(v, ref), k
            else:
                err = float((v.double() - ref.double()).norm() / max(float(ref.double().norm()), 1e-30))
                assert err < 2e-5, (k, err)
    for k in single:   # the same plan on every process, bit for bit
        assert torch.equal(got[0][k], got[1][k]), k


def test_a_process_without_batches_stops_every_process(tmp_path):
    got = _spawn(_stats_worker, tmp_path, ((0, 1, 2, 3), ()))
    assert got[1]["error"] == "PruningInputError: batches: no calibration batches given"
    assert got[0]["error"].startswith("PruningInputError: batches: 1 other process(es) refused their input")


def _fisher_worker(rank: int, port: int, outdir: str):
    _join_group(rank, port)
    model, batches = stats_problem()
    params = [(model.proj, "weight")]
    try:   # rank 1 holds no batches: its refusal (before, a local raise) must reach rank 0 too
        curv = Curvature(model, params, batches if rank == 0 else [], loss_fn=loss_fn)
        collect_fisher(curv, block_size=16, progress=False)
        res = {"ok": True}
    except Exception as e:   # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}"}
    _leave_group(res, outdir, rank)


def test_a_fisher_on_a_process_without_batches_stops_every_process(tmp_path):
    got = _spawn(_fisher_worker, tmp_path)
    assert got[1]["error"] == "PruningInputError: curvature: Fisher collection needs calibration batches"
    assert got[0]["error"].startswith("PruningInputError: batches: 1 other process(es) refused their input")


def _refuse_nan(model, batch):   # a user's forward that refuses a batch holding NaN (any shape)
    if torch.isnan(batch[0]).any():
        raise ValueError("NaN in the inputs")
    return model(batch[0])


def _bad_batch_worker(rank: int, port: int, outdir: str, mode: str):
    _join_group(rank, port)
    model, batches = problem()
    bad = batches[3][0].clone()
    if mode == "chain":   # another shape: refused in the chain check while the curvature is built
        bad = torch.randn(3, 5, 4, 4)
    else:                 # the same shape: passes the chain check, refused in the calibration pass
        bad[0, 0, 0, 0] = float("nan")
    mine = batches[:2] if rank == 0 else [batches[2], (bad, batches[3][1])]
    try:   # rank 1 refuses its second batch: before, rank 0 waited in a collective until the backend's timeout
        if mode == "onepass":
            Curvature.layerwise(model, [(model.conv, "weight"), (model.proj, "weight")], mine, loss_fn=loss_fn,
                                forward_fn=_refuse_nan, progress=False).hessians
        else:
            curv = Curvature.layerwise(model, [(b.fc, "weight") for b in model.layers], mine, loss_fn=loss_fn,
                                       forward_fn=_refuse_nan, sequential=True, progress=False)
            api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.5)
        res = {"ok": True}
    except Exception as e:   # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}"}
    _leave_group(res, outdir, rank)


@pytest.mark.parametrize("mode", ["onepass", "chain", "sequential"])
def test_a_process_refusing_a_batch_stops_every_process(tmp_path, mode):
    """In the one-pass collection, the chain check of a sequential curvature and a sequential plan's capture."""
    t0 = time.monotonic()
    got = _spawn(_bad_batch_worker, tmp_path, mode)
    assert got[1]["error"].startswith("PruningInputError: batches[1]: the model's forward pass failed"), got[1]
    assert got[0]["error"].startswith("PruningInputError: batches: 1 other process(es) refused their input"), got[0]
    assert time.monotonic() - t0 < 55     # at once, not at gloo's 60 s timeout
