"""Statistics collection, separate from every solve: forward hooks -> per-layer input Gram ``2 X X^T / n``.

Running means in fp32 (or float64 on request): ``H <- H * n/(n+b) + 2 X_b X_b^T/(n+b)``, so a long calibration
run never sums huge numbers.  ``n`` counts input rows (tokens, or conv output positions).  With
torch.distributed initialised, ``(H*n, n)`` are all-reduced so N processes that each saw 1/N of the data give
the same H as one process that saw all of it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PruningInputError
from ..targets import Target, layer_kind
from .batching import move


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as (rows, in_features) columns matching the 2-D weight view."""
    kind = layer_kind(module)
    if kind == "conv2d":
        if x.dim() == 3:                  # an unbatched (C, H, W) input
            x = x.unsqueeze(0)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            # 'same' (possibly uneven) / 'valid', or reflect/replicate/circular: pad exactly as the layer does
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


# the token mask of the batch now running (a dict batch's 2-D attention_mask, when it masks something): padded
# positions are not calibration data, so their rows stay out of every (batch, token, features) layer input's Gram
_ROW_MASK: contextvars.ContextVar = contextvars.ContextVar("obs_plugins_row_mask", default=None)


def row_mask(batch) -> torch.Tensor | None:
    """``batch["attention_mask"]`` as a bool (batch, tokens) tensor when it masks any position, else ``None``."""
    if not hasattr(batch, "keys") or "attention_mask" not in batch:
        return None
    m = batch["attention_mask"]
    if not torch.is_tensor(m) or m.dim() != 2 or bool(m.bool().all()):
        return None
    return m.bool()


@contextlib.contextmanager
def masking_rows(mask: torch.Tensor | None):
    token = _ROW_MASK.set(mask)
    try:
        yield
    finally:
        _ROW_MASK.reset(token)


def _real_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` of a Linear / Conv1D input ``x`` without the padded positions of the running batch (if any): for
    inputs shaped (batch, tokens, features) like the mask, or flattened batch-major to (batch * tokens, features)
    (``h.view(-1, d)`` of a (batch, tokens, d) tensor, as Hugging Face MoE routers take it)."""
    m = _ROW_MASK.get()
    if m is None:
        return rows
    tokens = x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape)
    # the tokens flattened to (batch * tokens, features) in the mask's order, as a MoE router takes them
    flat = x.dim() == 2 and m.shape[1] > 1 and x.shape[0] == m.numel()
    if not (tokens or flat):
        return rows
    return rows[m.to(rows.device).reshape(-1)]


class GramAccumulator:
    """Running mean of ``2 x x^T`` over input rows for one layer."""

    def __init__(self, d: int, device, dtype=torch.float32):
        self.H = torch.zeros(d, d, device=device, dtype=dtype)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        b = rows.shape[0]
        if b == 0:
            return
        x = rows.to(self.H.dtype)
        self.H.mul_(self.n / (self.n + b))
        self.H.addmm_(x.t(), x, alpha=2.0 / (self.n + b))
        self.n += b

    def same_as(self, other: "GramAccumulator") -> None:
        """Become a copy of ``other`` (for a layer that saw exactly the same inputs: bit-identical to adding)."""
        self.H.copy_(other.H)
        self.n = other.n

    def all_reduce(self) -> None:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        total = self.H * self.n
        n = torch.tensor([float(self.n)], device=self.H.device, dtype=torch.float64)
        dist.all_reduce(total)
        dist.all_reduce(n)
        self.n = int(n.item())
        self.H = total / max(self.n, 1)


def add_gram_hooks(targets: list[Target], accs: dict[str, GramAccumulator]):
    """Forward hooks adding each target's input rows to its accumulator.

    Linear layers fed the very same input tensor (a transformer's q/k/v projections, gate/up) share the work:
    the first computes ``x x^T``, the others copy its accumulator -- bit-identical to adding, because the two
    accumulators have seen the same inputs since they started (checked: otherwise each adds its own)."""
    last = {}  # the input tensor the last Linear hook saw, its version, and the accumulator that added it
    twin: dict[str, str] = {}  # key -> key of the accumulator it has been a copy of since its first batch

    handles = []
    for t in targets:
        def hook(module, args, _out, _key=t.key):
            raw, acc = args[0], accs[_key]
            kind = layer_kind(module)
            if kind == "conv2d":
                acc.add(input_rows(module, raw.detach()))
                return
            if kind == "conv1d":  # Hugging Face Conv1D: (batch, token, feature) like a Linear, padding left out
                acc.add(_real_rows(raw, input_rows(module, raw.detach())))
                return
            src = last.get("key")
            if (src is not None and last["x"] is raw and last["version"] == raw._version
                    and accs[src].H.shape == acc.H.shape and (acc.n == 0 or twin.get(_key) == src)
                    and last["n_before"] == acc.n):
                acc.same_as(accs[src])
                twin[_key] = src
                return
            twin.pop(_key, None)
            n_before = acc.n
            acc.add(_real_rows(raw, input_rows(module, raw.detach())))
            last.update(key=_key, x=raw, version=raw._version, n_before=n_before)
        handles.append(t.module.register_forward_hook(hook))
    return handles


def run_batches(model: nn.Module, batches: Iterable, forward_fn: Callable, *, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            with masking_rows(row_mask(batch)):
                forward_fn(model, batch)


class _Stop(Exception):
    pass


def find_block_list(model: nn.Module, targets: list[Target]) -> tuple[str, nn.ModuleList]:
    """The nn.ModuleList of repeated blocks (e.g. ``model.layers``) holding the most targets."""
    owners = {id(t.module) for t in targets}
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            inside = sum(1 for blk in mod for m in blk.modules() if id(m) in owners)
            if inside and (best is None or inside > best[0]):
                best = (inside, name, mod)
    if best is None:
        raise ValueError("sequential=True needs the model to hold its layers in an nn.ModuleList "
                         "(such as model.layers); none holds the targets")
    return best[1], best[2]


def block_stack(model: nn.Module, targets: list[Target]) -> nn.ModuleList | None:
    """The block stack holding *every* target, each in exactly one block, or None (no stack, some target outside
    it, or a layer shared by two blocks: its Gram needs both blocks' inputs, which a block-by-block plan does
    not have at once)."""
    try:
        _, blocks = find_block_list(model, targets)
    except ValueError:
        return None
    homes: dict[int, int] = {}
    for blk in blocks:
        for m in {id(m) for m in blk.modules()}:
            homes[m] = homes.get(m, 0) + 1
    return blocks if all(homes.get(id(t.module)) == 1 for t in targets) else None


def chain_inputs(model: nn.Module, blocks: nn.ModuleList, batch, forward_fn: Callable) -> tuple[bool, bool]:
    """``(chain, shared)`` from one forward pass on ``batch``.  ``chain``: every block is called once, in order,
    each fed (as its first positional input) exactly the previous block's output -- what sequential calibration
    assumes when it feeds block i's outputs to block i+1; a residual added outside the blocks (``x = x + blk(x)``)
    or parallel branches break it.  ``shared``: every block gets block 0's other inputs (positional after the
    first, and keyword) -- equal values, caches aside.  Not shared where the model hands each block its own:
    per-layer attention masks (sliding / full layers: Qwen2/3, Gemma 2/3), per-layer rotary tables (Gemma 3), a
    position bias that block 0 computes for the others (T5).  Sequential calibration must then replay each
    block's own inputs (:func:`capture_block_inputs` with ``blocks``)."""
    seen = []

    def hook(_m, args, kwargs, out, i):
        first_out = out[0] if isinstance(out, (tuple, list)) else out
        seen.append((i, args[0] if args else None, first_out, (list(args[1:]), stateless_kwargs(dict(kwargs)))))

    handles = [blk.register_forward_hook(lambda m, a, k, o, _i=i: hook(m, a, k, o, _i), with_kwargs=True)
               for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    if [s[0] for s in seen] != list(range(len(blocks))):
        return False, False
    for (_, _, out, _), (_, nxt, _, _) in zip(seen, seen[1:]):
        if not (torch.is_tensor(out) and torch.is_tensor(nxt) and out.shape == nxt.shape and torch.equal(out, nxt)):
            return False, False
    shared = all(_same(s[3], seen[0][3]) for s in seen[1:])
    return torch.is_tensor(seen[0][1]), shared


def chain_inputs_over(model: nn.Module, blocks: nn.ModuleList, batches, forward_fn: Callable) -> tuple[bool, bool]:
    """:func:`chain_inputs` on one batch of every distinct input shape in ``batches``: whether blocks get inputs
    of their own can depend on the length (a sliding-window mask equals the full one while the sequence fits
    the window), so one short first batch must not decide for longer ones."""
    seen, chain, shared = set(), True, True
    for b in batches:
        sig = _shapes(b)
        if sig in seen:
            continue
        seen.add(sig)
        c, sh = chain_inputs(model, blocks, b, forward_fn)
        chain, shared = chain and c, shared and sh
        if not chain:
            break
    return chain, shared


def _shapes(x):
    if torch.is_tensor(x):
        return tuple(x.shape)
    if isinstance(x, dict):
        return tuple((k, _shapes(v)) for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return tuple(_shapes(v) for v in x)
    return None


def _same(a, b) -> bool:
    """Equal values (tensors by shape, dtype and content; containers element by element)."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- objects without a usable ==: not known to be equal
        return False


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _is_kv_cache(v) -> bool:
    return v is not None and hasattr(v, "update") and hasattr(v, "get_seq_length")


def stateless_kwargs(kwargs: dict) -> dict:
    """A block's keyword inputs without key/value caches: the blocks are re-run several times on the same cached
    inputs (collect, then propagate), and a cache (e.g. transformers' DynamicCache) would grow on every run, so
    later runs attend to the earlier runs' keys.  ``use_cache`` is switched off."""
    out = {}
    for k, v in kwargs.items():
        if k in _CACHE_KWARGS or _is_kv_cache(v):
            out[k] = None
        elif k == "use_cache":
            out[k] = False
        else:
            out[k] = v
    return out


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the duration, then every submodule's own ``training`` flag back (``model.train(was)``
    would also flip a submodule the user keeps in eval mode, e.g. a frozen BatchNorm, to training)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


@contextlib.contextmanager
def no_kv_cache(model):
    """``model.config.use_cache = False`` for the duration (restored), so no cache is built at all."""
    cfg = getattr(model, "config", None)
    had = cfg is not None and hasattr(cfg, "use_cache")
    old = cfg.use_cache if had else None
    if had:
        cfg.use_cache = False
    try:
        yield
    finally:
        if had:
            cfg.use_cache = old


def capture_block_inputs(model, first_block, batches, forward_fn, *, blocks=None, store=None,
                         compute=None) -> list[tuple[list, dict]]:
    """The positional and keyword inputs of ``first_block`` for every batch (the forward stops there), without
    key/value caches (:func:`stateless_kwargs`).  With ``blocks`` (the stack, ``blocks[0] is first_block``) the
    dense forward runs on to the last block and keeps every block's own other inputs too (all but the hidden
    states, which the calibration feeds itself); ``cached.at(i)`` gives block i's inputs.  ``store`` (offload):
    the device the inputs are kept on between block runs, each moved there as soon as it is caught; the blocks
    run on ``compute`` (the model's device; see :class:`_Cached`)."""
    if blocks is not None and blocks[0] is not first_block:
        raise ValueError("capture_block_inputs: blocks[0] must be first_block")
    n = 1 if blocks is None else len(blocks)
    cached = _Cached()
    cached.store, cached.compute, cached._memo = store, compute, {}
    others: list[list] = [[] for _ in range(n)]

    def catch(_m, args, kwargs, i):
        if i == 0:
            cached.append(cached.keep((list(args), stateless_kwargs(dict(kwargs)))))
        else:
            others[i].append(cached.keep((list(args[1:]), stateless_kwargs(dict(kwargs)))))
        if i == n - 1:
            raise _Stop

    stack = [first_block] if blocks is None else list(blocks)
    hs = [blk.register_forward_pre_hook(lambda m, a, k, _i=i: catch(m, a, k, _i), with_kwargs=True)
          for i, blk in enumerate(stack)]
    try:
        with torch.no_grad(), no_kv_cache(model):
            for batch in batches:
                try:
                    forward_fn(model, batch)
                except _Stop:
                    pass
    finally:
        for h in hs:
            h.remove()
    cached._memo = None   # the capture's sharing is kept; later outputs are new tensors
    if len(cached) != len(batches) or any(len(o) != len(batches) for o in others[1:]):
        raise ValueError("sequential calibration: the forward pass did not reach every block for every batch")
    cached.row_masks = [row_mask(b) for b in batches]
    cached.per_block = None if blocks is None else others
    return cached


class _Cached(list):
    """Cached block inputs, one per batch, with each batch's token mask (``row_masks``) for the Gram hooks, and,
    where blocks get inputs of their own (``per_block[i][b]``: block i's other positional and keyword inputs
    for batch b), :meth:`at` to put them beside the current hidden states.

    Offload: with ``store`` set (CPU, for a model on an accelerator) every cached input and block output is
    kept there (:meth:`keep`) and moved to ``compute``, the model's device, only for the one batch a block is
    running on (:meth:`use`); so the accelerator holds one batch's activations, not the calibration set's.
    Without ``store`` both are the identity (nothing is copied)."""
    row_masks: list = []
    per_block: list | None = None
    store: torch.device | None = None
    compute: torch.device | None = None

    _memo: dict | None = None

    def keep(self, x):
        """``x`` (tensors, nested in tuples/lists/dicts) where the cache keeps it between block runs; during the
        capture a tensor every block is handed (a mask, rotary tables) is copied once, not once per block."""
        return x if self.store is None else move(x, self.store, self._memo)

    def use(self, x):
        """``x`` on the device the blocks run on."""
        return x if self.store is None else move(x, self.compute)

    def at(self, i: int) -> "_Cached":
        """The inputs of block ``i``: the cached hidden states with block i's own other inputs (``self`` where
        every block shares block 0's)."""
        if not self.per_block or i == 0:
            return self
        view = _Cached(([a[0]] + list(extra), kw) for (a, _), (extra, kw) in zip(self, self.per_block[i]))
        view.row_masks, view.store, view.compute = self.row_masks, self.store, self.compute
        return view


def _masks_of(cached) -> list:
    return getattr(cached, "row_masks", None) or [None] * len(cached)


def run_block(block, cached) -> list:
    """``block``'s outputs for every cached input (kept where the cache keeps its inputs)."""
    out = []
    with torch.no_grad():
        for one, m in zip(cached, _masks_of(cached)):
            a, k = cached.use(one)
            with masking_rows(m):
                out.append(cached.keep(block(*a, **k)))
    return out


def input_stages(block, targets: list[Target], one) -> list[tuple[list[Target], bool]]:
    """``targets`` of one block in stages, for sequential calibration inside the block: layers fed the very same
    input tensor (q/k/v; gate/up) form one stage, stages in the order the forward pass reaches them (one run of
    ``block`` on the cached input ``one``).  Stage j's Grams can then be collected with stages < j already
    planned, as SparseGPT/GPTQ's "true sequential" does.  Returns ``(stage, reused)`` pairs: ``reused`` when a
    layer of the stage runs more than once per forward pass (its Gram then needs the whole block run)."""
    seen: list[tuple[object, int, Target]] = []
    t_again: set[str] = set()
    handles = [t.module.register_forward_hook(
        lambda m, args, _o, _t=t: seen.append((args[0], args[0]._version, _t))) for t in targets]
    try:
        with torch.no_grad():
            block(*one[0], **one[1])
    finally:
        for h in handles:
            h.remove()
    stages: list[list[Target]] = []
    firsts: dict[str, bool] = {}
    for j, (x, v, t) in enumerate(seen):
        if t.key in firsts:
            t_again.add(t.key)
            continue  # a layer run twice in one forward keeps its first stage
        firsts[t.key] = True
        prev = seen[j - 1] if j else None
        if stages and prev is not None and prev[0] is x and prev[1] == v:
            stages[-1].append(t)
        else:
            stages.append([t])
    missing = [t.key for t in targets if t.key not in firsts]
    if missing:
        raise ValueError(f"sequential calibration: the block's forward pass did not reach {missing[:3]}")
    return [(st, any(t.key in t_again for t in st)) for st in stages]


def run_block_until(block, cached, modules) -> None:
    """Run ``block`` on every cached input only as far as needed: each forward stops once every module in
    ``modules`` has run (hooks registered before this one, e.g. Gram hooks, have already seen its input)."""
    want = {id(m) for m in modules}
    fired: set[int] = set()

    def stop(m, _args, _out):
        fired.add(id(m))
        if fired >= want:
            raise _Stop

    handles = [m.register_forward_hook(stop) for m in modules]
    try:
        with torch.no_grad():
            for one, m in zip(cached, _masks_of(cached)):
                a, k = cached.use(one)
                fired.clear()
                try:
                    with masking_rows(m):
                        block(*a, **k)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def feed(cached, outs) -> None:
    """The block's outputs become the next block's hidden-state inputs."""
    for (a, _k), o in zip(cached, outs):
        a[0] = o[0] if isinstance(o, (tuple, list)) else o


def collect_sequential(model, targets, batches, forward_fn, accs, *, on_block=None, progress=True, store=None,
                       compute=None):
    """Eager block-by-block calibration: each block sees the outputs of the already-processed (possibly
    pruned by ``on_block``) blocks before it; peak memory is one block's activations for the calibration set
    (kept on ``store`` when given, see :class:`_Cached`)."""
    from tqdm.auto import tqdm
    _, blocks = find_block_list(model, targets)
    in_blocks = {id(m) for blk in blocks for m in blk.modules()}
    outside = [t.key for t in targets if id(t.module) not in in_blocks]
    if outside:
        raise ValueError(f"sequential=True: targets outside the block stack are not supported: {outside[:5]}")
    if block_stack(model, targets) is None:
        raise PruningInputError("on_block: a target layer is shared by two blocks of the stack; block-by-block "
                                "calibration needs each in one block")
    chain, shared = chain_inputs_over(model, blocks, batches, forward_fn)
    if not chain:
        raise PruningInputError("on_block: the blocks of the stack are not a chain (a forward pass does not feed "
                                "each block exactly the previous block's output, e.g. a residual added outside "
                                "the blocks); block-by-block calibration would see other inputs than the model")
    cached = capture_block_inputs(model, blocks[0], batches, forward_fn, blocks=None if shared else blocks,
                                  store=store, compute=compute)
    by_block = [[t for t in targets if any(t.module is m for m in blk.modules())] for blk in blocks]
    for i, blk in enumerate(tqdm(blocks, desc="calibrating blocks", disable=not progress, leave=False)):
        handles = add_gram_hooks(by_block[i], accs)
        try:
            outs = run_block(blk, cached.at(i))
        finally:
            for hh in handles:
                hh.remove()
        for t in by_block[i]:
            accs[t.key].all_reduce()
        if on_block is not None and by_block[i] and on_block(i, by_block[i]):
            outs = run_block(blk, cached.at(i))
        feed(cached, outs)
