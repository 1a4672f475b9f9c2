"""Property-based tests (issue 22): for random layer shapes (widths not divisible by M included), amounts in
torch's two meanings (a fraction of the survivors or a count), N:M patterns and prior masks, every route --
``prune.global_unstructured``, ``OBSIHT.apply``, the torch.ao sparsifier and Continuous Sparsification -- prunes
exactly the promised count, never un-prunes a prior zero, and leaves the model bit-identical when it raises.

``OBS_HYPOTHESIS_EXAMPLES`` sets the examples per property (default 20, derandomized, so CI is reproducible).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from obs_plugins import OBSIHT, Curvature, PruningInputError  # noqa: E402
from obs_plugins.integrations.torch_ao import OBSIHTSparsifier  # noqa: E402
from obs_plugins.integrations.torch_prune import ContinuousSparsification  # noqa: E402
from obs_plugins.methods.continuous_sparsification import ContinuousSparsifier  # noqa: E402

EXAMPLES = settings(max_examples=int(os.environ.get("OBS_HYPOTHESIS_EXAMPLES", "20")), deadline=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))


class Problem:
    """A 2-layer model of random widths (first layer Linear or Conv2d), its calibration batches and the
    (module, "weight") pairs, with optional prior torch.nn.utils.prune masks."""

    def __init__(self, conv, d_in, hidden, d_out, seed, prior_frac):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if conv:  # input width of the 2-D weight view: channels * 3 * 3
            self.model = nn.Sequential(nn.Conv2d(d_in, hidden, 3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(hidden * 2 * 2, d_out))
            xs = [torch.randn(6, d_in, 4, 4, generator=g) for _ in range(3)]
        else:
            self.model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
            xs = [torch.randn(6, d_in, generator=g) for _ in range(3)]
        self.batches = [(x, torch.randint(0, d_out, (6,), generator=g)) for x in xs]
        self.params = [(self.model[0], "weight"), (self.model[-1], "weight")]
        if prior_frac:
            for m, n in self.params:
                prune.custom_from_mask(m, n, (torch.rand(getattr(m, n).shape, generator=g) >= prior_frac).float())

    def masks(self):
        return [getattr(m, n + "_mask").bool().clone() if hasattr(m, n + "_mask")
                else torch.ones_like(getattr(m, n), dtype=torch.bool) for m, n in self.params]

    def survivors(self):
        return sum(int(k.sum()) for k in self.masks())

    def state(self):
        m = self.model
        return ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()],
                sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules()))


def same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


@st.composite
def problems(draw, prior=True, conv=True):
    return Problem(conv=conv and draw(st.booleans()), d_in=draw(st.integers(1, 11)), hidden=draw(st.integers(1, 9)),
                   d_out=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2 ** 16)),
                   prior_frac=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])) if prior else 0.0)


def amounts(draw, avail):
    """torch's amount: a float fraction of the survivors, or an int count (sometimes above what is left)."""
    if draw(st.booleans()):
        return draw(st.floats(0.0, 1.0, allow_nan=False))
    return draw(st.integers(0, avail + 2))


def promised(amount, avail):
    return round(amount * avail) if isinstance(amount, float) else amount


def check_route(p, amount, run):
    """``run()`` prunes ``amount`` of the survivors: exactly that many new zeros in the masks, prior zeros kept,
    finite weights; or it raises PruningInputError and the model is bit-identical."""
    avail, before, prior = p.survivors(), p.state(), p.masks()
    k = promised(amount, avail)
    if k > avail:
        with pytest.raises(PruningInputError, match="amount"):
            run()
        assert same(before, p.state())
        return
    run()
    after = p.masks()
    assert sum(int(a.sum()) for a in after) == avail - k
    assert all(not (a & ~b).any() for a, b in zip(after, prior))  # never un-prunes a prior zero
    assert all(torch.isfinite(getattr(m, n)).all() for m, n in p.params)
    assert all(bool((getattr(m, n)[~a] == 0).all()) for (m, n), a in zip(p.params, after))  # pruned: exactly 0


@EXAMPLES
@given(st.data(), problems())
def test_global_unstructured_prunes_exactly_the_promised_count(data, p):
    amount = amounts(data.draw, p.survivors())
    with_loss = data.draw(st.booleans())  # with a loss the default allocation is the global ranking
    curv = Curvature.layerwise(p.model, p.params, p.batches, loss_fn=F.cross_entropy if with_loss else None,
                               progress=False)
    check_route(p, amount, lambda: prune.global_unstructured(p.params, pruning_method=OBSIHT, amount=amount,
                                                             curvature=curv, progress=False))


@EXAMPLES
@given(st.data(), problems())
def test_apply_prunes_exactly_the_promised_count_of_one_tensor(data, p):
    m, n = p.params[data.draw(st.integers(0, 1))]
    p.params = [(m, n)]  # the other tensor is not touched, so only this one is checked
    amount = amounts(data.draw, p.survivors())
    curv = Curvature.layerwise(p.model, p.params, p.batches, progress=False)
    check_route(p, amount, lambda: OBSIHT.apply(m, n, amount=amount, curvature=curv, progress=False))


@EXAMPLES
@given(st.data(), problems(prior=False))
def test_torch_ao_sparsifier_reaches_its_sparsity_level_per_tensor(data, p):
    level = data.draw(st.floats(0.0, 1.0, allow_nan=False))
    curv = Curvature.layerwise(p.model, p.params, p.batches, progress=False)
    sp = OBSIHTSparsifier(curv, sparsity_level=level, progress=False)
    fqns = [f"{0}.weight", f"{len(p.model) - 1}.weight"]
    sp.prepare(p.model, [{"tensor_fqn": f} for f in fqns])
    sp.step()
    for m, n in p.params:
        w = getattr(m, n)
        assert int((w == 0).sum()) >= round(level * w.numel())
        assert int((m.parametrizations[n][0].mask == 0).sum()) == round(level * w.numel())


@EXAMPLES
@given(st.data(), problems())
def test_continuous_sparsification_prunes_exactly_the_promised_count(data, p):
    cs = ContinuousSparsifier(p.model, p.params, progress=False)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    with torch.no_grad():
        for s in cs.scores.values():  # a finished search's learned scores, ties included
            s.copy_(torch.randint(-3, 4, s.shape, generator=g).float())
    cs.finish(rewind=False)
    amount = amounts(data.draw, p.survivors())
    check_route(p, amount, lambda: prune.global_unstructured(p.params, pruning_method=ContinuousSparsification,
                                                             amount=amount, sparsifier=cs))


@EXAMPLES
@given(st.data(), problems(prior=False))
def test_nm_prunes_n_of_every_m_or_names_the_layer(data, p):
    n, m = data.draw(st.sampled_from([(1, 2), (2, 4), (1, 4)]))
    curv = Curvature.layerwise(p.model, p.params, p.batches, progress=False)
    widths = [getattr(mod, name).reshape(getattr(mod, name).shape[0], -1).shape[1] for mod, name in p.params]
    before = p.state()

    def run():
        prune.global_unstructured(p.params, pruning_method=OBSIHT, amount=n / m, curvature=curv, nm=f"{n}:{m}",
                                  progress=False)
    bad = [i for i, w in enumerate(widths) if w % m]
    if bad:
        with pytest.raises(PruningInputError, match=rf"nm: .*{widths[bad[0]]}"):
            run()
        assert same(before, p.state())
        return
    run()
    for (mod, name), w in zip(p.params, widths):
        mask = getattr(mod, name + "_mask").reshape(-1, w).bool()
        groups = mask.reshape(mask.shape[0], w // m, m)
        assert ((~groups).sum(-1) == n).all()  # exactly n of every m pruned, in every row and group
