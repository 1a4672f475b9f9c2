"""Device-agnostic code, checked without a GPU: the routes of ``fake_cuda_routes.py`` run with the model on the
stand-in CUDA device of ``fake_cuda.py`` (CUDA's device-mixing rules applied to every op; computed on the CPU)
and must give the CPU run's result: the same zeros in every tensor, the same values to float rounding (the
stand-in runs some composite ops decomposed), and the same extras.  Each route runs in a subprocess: the
stand-in renames torch's spare backend for its whole process.  (The stand-in does not model ``tensor.data =``
on a device tensor, which ``prune.remove`` uses: the routes keep their masks; the comparison with the CPU run
would show such a gap.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(*args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, os.path.join(HERE, "fake_cuda_routes.py"), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    return {r.get("route", r.get("measure")): r for r in rows}


@pytest.fixture(scope="module")
def runs():
    return _run(), _run("--cpu")


def test_the_stand_in_catches_device_mixing():
    """The harness itself: a CPU tensor with dimensions mixed into a device op raises, as on CUDA; a 0-dim CPU
    scalar does not (CUDA allows it); a device copy reports the device and keeps the values."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import torch, fake_cuda as fc\n"
            "with fc.MODE:\n"
            "    x = fc.FakeCudaTensor(torch.arange(4.))\n"
            "    assert x.device.type == 'fcuda' and (x * torch.tensor(2.)).inner.tolist() == [0., 2., 4., 6.]\n"
            "    y = torch.ones(4).to(x.device); assert isinstance(y, fc.FakeCudaTensor)\n"
            "    z = torch.tensor([1, 2], device=x.device); assert isinstance(z, fc.FakeCudaTensor)\n"
            "    try:\n"
            "        x + torch.ones(4)\n"
            "    except fc.DeviceMixingError as e:\n"
            "        print('caught', e)\n"
            "    try:\n"
            "        torch.zeros(4)[x.long()]\n"
            "    except fc.DeviceMixingError as e:\n"
            "        print('caught', e)\n") % HERE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("caught") == 2, out.stdout


ROUTES = ["obs_iht_sequential_T2", "obs_iht_global_T2", "obs_iht_owl", "cli_model_device", "wanda_unstructured", "global_unstructured", "limit_estimate",
          "cs_fit_batch_encoding", "bad_batch_named", "onnx_export_verify"]


@pytest.mark.parametrize("route", ROUTES)
def test_route_runs_on_a_cuda_like_device_as_on_the_cpu(runs, route):
    dev, cpu = runs[0][route], runs[1][route]
    assert cpu["ok"], cpu
    assert dev["ok"], dev          # a crash on the stand-in: its error and the last frames
    assert [r[0] for r in dev["fingerprint"]] == [r[0] for r in cpu["fingerprint"]]
    for (name, s_d, q_d, z_d), (_, s_c, q_c, z_c) in zip(dev["fingerprint"], cpu["fingerprint"]):
        if route == "cli_model_device" and name in cpu["extra"]["zeros"]:
            continue       # see the route: its pruned tensors are compared by their exact zero counts (extra)
        assert z_d == z_c, f"{route}: {name} has other zeros on the device"
        assert math.isclose(q_d, q_c, rel_tol=1e-5, abs_tol=1e-9), (route, name, q_d, q_c)
        assert math.isclose(s_d, s_c, rel_tol=1e-4, abs_tol=1e-5), (route, name, s_d, s_c)
    extra = dict(dev["extra"])
    if route == "obs_iht_sequential_T2":
        assert extra.pop("offload") is True and cpu["extra"].pop("offload") is False   # "auto": only off the CPU
    if route == "cli_model_device":   # obs-prune prune --model ... --device: pruned there, saved, reloaded
        assert extra["rc"] == 0 and extra.pop("pruned_on") == ["fcuda:0"] and cpu["extra"].pop("pruned_on") == ["cpu"]
    if route == "bad_batch_named":
        assert extra["named"], extra["message"]
    if route == "onnx_export_verify":   # the copy is on the CPU; the caller's model stays where it was
        assert extra["ok"] and extra["copy_devices"] == ["cpu"] and extra["sparsity"] == [0.5, 0.5, 0.5]
        assert extra.pop("model_devices") == ["fcuda:0"] and cpu["extra"].pop("model_devices") == ["cpu"]
    assert extra == cpu["extra"]


def test_an_offloaded_sequential_plan_holds_one_blocks_state_on_the_device():
    """Under offload a solved block's Grams, inverse factors and planned weights wait in CPU memory, so the device
    holds the same bytes after every block of a 6-block plan; without offload they pile up there, block by block
    (a 7B model's Grams and factors alone are tens of GB)."""
    m = _run("sequential_plan_memory")["sequential_plan_memory"]["result"]
    off, on_device = m["True"], m["False"]
    assert len(off["samples"]) == len(on_device["samples"]) == 5      # after blocks 0..4 (the last feeds nothing)
    assert len(set(off["samples"])) == 1, off["samples"]
    assert off["gram_devices"] == off["plan_devices"] == off["factor_devices"] == ["cpu"]
    grow = [b - a for a, b in zip(on_device["samples"], on_device["samples"][1:])]
    assert min(grow) > on_device["block0_gram_bytes"], grow          # the measure sees what offload saves
    assert on_device["gram_devices"] == on_device["plan_devices"] == ["fcuda:0"]


def test_global_allocation_under_offload_ranks_with_one_layers_gram_on_the_device():
    """Global allocation ranks on the one-pass Grams of every layer.  Under offload they are collected block by
    block and wait in CPU memory, each moved to the device for its factor: during the ranking the device holds less
    than one block's Grams beyond the model, where without offload every Gram (and more) sits there."""
    m = _run("global_ranking_memory")["global_ranking_memory"]["result"]
    off, on_device = m["True"], m["False"]
    grams = off["all_gram_bytes"]                      # 6 blocks
    assert len(off["samples"]) == len(on_device["samples"]) == 42   # one factor per layer
    assert max(off["samples"]) - off["model_bytes"] < grams / 6, off     # beyond the model: under one block's
    assert min(on_device["samples"]) - on_device["model_bytes"] > grams, on_device   # every Gram, and more
