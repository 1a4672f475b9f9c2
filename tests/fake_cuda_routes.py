"""Run the library's routes with the model on the stand-in CUDA device of ``fake_cuda.py`` (or on the CPU with
``--cpu``) and print one JSON line per route: whether it ran, and a fingerprint of its result.  The stand-in
computes on the CPU, so a device-agnostic route must give the CPU's result bit for bit.

    python tests/fake_cuda_routes.py [--cpu] [route ...]
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CPU = "--cpu" in sys.argv
if not CPU:
    import fake_cuda  # noqa: E402  (renames the spare backend: this process only)


def on_device(model):
    return model if CPU else fake_cuda.to_device(model)


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.inner if not CPU and isinstance(t, fake_cuda.FakeCudaTensor) else t


def fingerprint(model) -> list:
    """Per floating tensor of the state dict: the sum and the sum of squares of its values (float64) and a hash
    of where its zeros are."""
    import hashlib
    out = []
    for name, p in sorted(model.state_dict().items()):
        if p.is_floating_point():
            q = plain(p).detach().double()
            zeros = hashlib.sha1((q == 0).numpy().tobytes()).hexdigest()
            out.append([name, float(q.sum()), float((q * q).sum()), zeros])
    return out


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def llama_batches():
    from obs_plugins.lm import causal_lm_batches
    return causal_lm_batches(torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)), 2)


def llama_params(m):
    from obs_plugins.targets import prunable_linear_targets
    return [(t.module, t.name) for t in prunable_linear_targets(m, exclude=("lm_head",))]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def mlp_batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def mlp_params(m):
    return [(mm, "weight") for mm in m if isinstance(mm, nn.Linear)]


def r_obs_iht_sequential_T2():
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.lm import causal_lm_loss
    m = on_device(llama())
    c = Curvature.layerwise(m, llama_params(m), llama_batches(), loss_fn=causal_lm_loss, progress=False)
    # fp32 gradients on both sides ("auto" takes bf16 on a CPU with bf16 units, and the stand-in is no CPU)
    api.prune(OBSIHTConfig(iterations=2, grad_dtype="float32", progress=False), curvature=c, amount=0.5)
    return m, {"offload": c.offload is not None}


def r_wanda_unstructured():
    from obs_plugins import Curvature, api
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.methods.magnitude import WandaConfig
    m = on_device(llama())
    c = Curvature.layerwise(m, llama_params(m), llama_batches(), loss_fn=causal_lm_loss, progress=False)
    api.prune(WandaConfig(), curvature=c, amount=0.5)
    return m, {}


def r_global_unstructured():
    from torch.nn.utils import prune

    from obs_plugins import OBSIHT, Curvature
    m = on_device(mlp())
    ps = mlp_params(m)
    c = Curvature.layerwise(m, ps, mlp_batches(), loss_fn=F.cross_entropy, progress=False)
    prune.global_unstructured(ps, pruning_method=OBSIHT, amount=0.5, curvature=c, iterations=2)
    return m, {}


def r_limit_estimate():
    from obs_plugins.limit import estimate
    m = on_device(mlp())
    r = estimate(m, mlp_batches(), F.cross_entropy, steps=8, probes=1, sweep=True, sparsities=[0.3, 0.6],
                 progress=False)
    return m, {"predicted": r.predicted, "path": r.path["predicted"]}


def r_cs_fit_batch_encoding():
    """Hugging Face collators return a BatchEncoding (a UserDict, not a dict): moved, and still one."""
    from transformers import BatchEncoding

    from obs_plugins import ContinuousSparsifier

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x, labels=None):
            return self.b(torch.relu(self.a(x)))

    g = torch.Generator().manual_seed(0)
    batches = [BatchEncoding({"x": torch.randn(4, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)})
               for _ in range(4)]
    torch.manual_seed(0)
    m = on_device(Net())
    cs = ContinuousSparsifier(m, [(m.a, "weight"), (m.b, "weight")], rounds=1, epochs=2, rewind_step=1,
                              progress=False)
    cs.fit(batches, lambda out, b: F.cross_entropy(out, b.labels), lr=0.1)   # attribute access, as HF allows
    cs.make_plan(amount=0.5).apply()
    return m, {}


def r_bad_batch_named():
    """A calibration batch the model refuses is named by its index, also after its move to the device: here a
    batch of the same shape as the others, holding a NaN that the user's forward refuses."""
    from obs_plugins import Curvature
    from obs_plugins.errors import CurvatureError

    def forward(model, batch):
        if torch.isnan(batch[0]).any():
            raise ValueError("NaN in the inputs")
        return model(batch[0])

    m = on_device(mlp())
    batches = mlp_batches()
    x = batches[2][0].clone()
    x[0, 0] = float("nan")
    batches[2] = (x, batches[2][1])
    try:
        c = Curvature.layerwise(m, mlp_params(m), batches, loss_fn=F.cross_entropy, forward_fn=forward,
                                progress=False)
        c.hessians
    except (CurvatureError, ValueError, RuntimeError) as e:
        return m, {"named": str(e).startswith("batches[2]"), "message": str(e).splitlines()[0][:200]}
    return m, {"named": False, "message": "no error"}


def r_onnx_export_verify():
    """Export traces a baked copy in CPU memory; verify's reference pass runs where the model is."""
    import tempfile

    from torch.nn.utils import prune

    from obs_plugins.integrations import onnx as ox
    m = on_device(mlp())
    for mod, name in mlp_params(m):
        prune.l1_unstructured(mod, name, amount=0.5)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as d:
        res = ox.export(m, x, os.path.join(d, "m.onnx"))
        cp_devices = sorted({str(t.device) for t in ox.baked_copy(m).state_dict().values()})
        rep = ox.verify(res, m, x, bench=False)
    return m, {"ok": rep.ok, "copy_devices": cp_devices, "model_devices": sorted({str(t.device) for t in m.state_dict().values()}),
               "sparsity": [round(r["onnx_sparsity"], 6) for r in rep.sparsity]}


def char_tokenizer():
    """A one-id-per-character tokenizer (letters and digits), saved with a model like a real one."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = string.ascii_letters + string.digits    # 62 + [UNK]: the tiny Llama's 64 ids
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def r_cli_model_device():
    """``obs-prune prune --model ... --device``: the Hugging Face route with the model moved to the device.  The
    stand-in's decomposed attention rounds otherwise than the CPU's kernel, and at this size OBS amplifies that
    past float tolerance and flips near-ties, so the test compares where it pruned, the exact zero counts and the
    tensors no plan touched."""
    import string
    import tempfile

    from transformers import AutoModelForCausalLM

    from obs_plugins import cli
    from obs_plugins.integrations.optimum import PruningConfig
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "src"), os.path.join(d, "out")
        llama().save_pretrained(src)
        char_tokenizer().save_pretrained(src)
        PruningConfig(method="obs_iht", sparsity=0.5, num_samples=8, seq_len=16, batch_size=2,
                      method_config={"iterations": 1}).save_pretrained(d)
        with open(os.path.join(d, "calib.txt"), "w") as f:
            g = torch.Generator().manual_seed(2)
            abc = string.ascii_letters + string.digits   # every id (fewer distinct tokens than the width
            f.write("".join(abc[int(c)] for c in torch.randint(0, 62, (600,), generator=g)))   # leave Grams singular)
        if not CPU:   # what model.to('cuda') does; the stand-in cannot replace .data in place
            torch.__future__.set_overwrite_module_params_on_conversion(True)
        from obs_plugins.integrations.optimum import Pruner
        seen, prune = [], Pruner.prune

        def recorded(self, *args, **kwargs):
            seen.append(str(next(self.model.parameters()).device))
            return prune(self, *args, **kwargs)
        Pruner.prune = recorded
        rc = cli.main(["prune", "--model", src, "--config", os.path.join(d, "pruning_config.json"), "--out", out,
                       "--calibration", os.path.join(d, "calib.txt"), "--quiet",
                       "--device", "cpu" if CPU else "fcuda"])
        Pruner.prune = prune
        back = AutoModelForCausalLM.from_pretrained(out)
    zeros = {k: int((v == 0).sum()) for k, v in back.state_dict().items() if k.endswith("proj.weight")}
    return back, {"rc": rc, "pruned_on": seen, "zeros": zeros}


def r_obs_iht_global_T2():
    """Global allocation ranks where the weights wait (CPU memory under offload) and iterates from there."""
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.lm import causal_lm_loss
    m = on_device(llama())
    c = Curvature.layerwise(m, llama_params(m), llama_batches(), loss_fn=causal_lm_loss, progress=False)
    p = api.prune(OBSIHTConfig(iterations=2, allocation="global", grad_dtype="float32", progress=False),
                  curvature=c, amount=0.6)
    return m, {"layer_sparsity": {k: round(v, 6) for k, v in p.report["layer_sparsity"].items()}}


def r_obs_iht_owl():
    from obs_plugins import Curvature, OBSIHTConfig, api
    m = on_device(llama())
    c = Curvature.layerwise(m, llama_params(m), llama_batches(), progress=False)
    p = api.prune(OBSIHTConfig(iterations=1, allocation="owl", progress=False), curvature=c, amount=0.6)
    return m, {"layer_sparsity": {k: round(v, 6) for k, v in p.report["layer_sparsity"].items()}}


def m_sequential_plan_memory():
    """Device bytes after each block of a sequential T=1 plan of a 6-block Llama, with and without offload."""
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.curvature import core
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    out = {}
    feed = core.feed
    for off in (True, False):
        m = on_device(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=6, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=64)).eval())
        samples = []

        def sampled(cached, outs):
            feed(cached, outs)
            samples.append(fake_cuda.device_bytes())
        core.feed = sampled
        try:
            c = Curvature.layerwise(m, llama_params(m), llama_batches(), offload=off, progress=False)
            plan = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=c, amount=0.5)
        finally:
            core.feed = feed
        gram = sum(h.numel() * h.element_size() for k, h in c.hessians.items() if "layers.0." in k)
        out[str(off)] = {"samples": samples, "block0_gram_bytes": gram,
                         "gram_devices": sorted({str(h.device) for h in c.hessians.values()}),
                         "plan_devices": sorted({str(t.device) for e in plan.entries.values()
                                                 for t in (e.mask, e.new_weight)}),
                         "factor_devices": sorted({str(f.hinv.device) for f in
                                                   plan.solver_state["factors"].values()})}
        del m, c, plan
    return out


def m_global_ranking_memory():
    """Device bytes at each layer of global allocation's ranking (6-block Llama), with and without offload."""
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.methods.obs_iht import allocation
    from transformers import LlamaConfig, LlamaForCausalLM
    out = {}
    real = allocation.inverse_factor
    for off in (True, False):
        torch.manual_seed(0)
        m = on_device(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=6, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=64)).eval())
        samples, model_bytes = [], fake_cuda.device_bytes()

        def sampled(H, *a, **k):
            samples.append(fake_cuda.device_bytes())
            return real(H, *a, **k)
        allocation.inverse_factor = sampled
        try:
            c = Curvature.layerwise(m, llama_params(m), llama_batches(), loss_fn=causal_lm_loss, offload=off,
                                    progress=False)
            api.plan(OBSIHTConfig(iterations=1, allocation="global", progress=False), curvature=c, amount=0.5)
        finally:
            allocation.inverse_factor = real
        grams = sum(h.numel() * h.element_size() for h in c.hessians.values())
        out[str(off)] = {"samples": samples, "all_gram_bytes": grams, "model_bytes": model_bytes}
        del m, c
    return out


ROUTES = {k[2:]: v for k, v in list(globals().items()) if k.startswith("r_")}
MEASURES = {k[2:]: v for k, v in list(globals().items()) if k.startswith("m_")}


def main(names):
    for name in names or list(ROUTES):
        if name in MEASURES:   # not a route: its own JSON line, on the device only
            with fake_cuda.MODE:
                print(json.dumps({"measure": name, "result": MEASURES[name]()}), flush=True)
            continue
        try:
            if CPU:
                model, extra = ROUTES[name]()
            else:
                with fake_cuda.MODE:
                    model, extra = ROUTES[name]()
            print(json.dumps({"route": name, "ok": True, "extra": extra, "fingerprint": fingerprint(model)}),
                  flush=True)
        except Exception as e:  # the test reads the failure from the JSON line
            tb = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)[-6:]]
            print(json.dumps({"route": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:400], "where": tb}),
                  flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--cpu"])
