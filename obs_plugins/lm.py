"""Causal-LM helpers (no transformers import): calibration batches, loss, perplexity."""
from __future__ import annotations

import math

import torch


def causal_lm_batches(windows: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """Split (n, seq_len) token windows into ``{"input_ids", "labels"}`` batches (labels = inputs)."""
    if windows.dim() != 2:
        raise ValueError(f"windows: expected (n, seq_len), got {tuple(windows.shape)}")
    return [{"input_ids": windows[i:i + batch_size], "labels": windows[i:i + batch_size]}
            for i in range(0, windows.shape[0], batch_size)]


def causal_lm_loss(output, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (not padded: ``attention_mask``) targets; uses the model's own
    ``loss`` when labels were passed."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = output.logits if hasattr(output, "logits") else output[0]
    ids = batch["input_ids"]
    targets = ids[:, 1:]
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if torch.is_tensor(mask) and mask.shape == ids.shape and not bool(mask.bool().all()):
        # a target counts when it is a real token predicted from a real one (right padding: pads are no targets;
        # left padding: the first real token has only a pad before it)
        real = mask[:, 1:].bool() & mask[:, :-1].bool()
        if not bool(real.any()):
            return logits.sum() * 0.0   # nothing to predict in this batch (not NaN)
        targets = targets.masked_fill(~real, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def perplexity(model, batches, *, progress: bool = True, desc: str = "perplexity") -> float:
    """exp of the mean per-token loss over equal-length batches."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    from .curvature.collect import eval_mode
    tot, n = 0.0, 0
    with eval_mode(model):   # each submodule's own training flag comes back
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            b = {k: v.to(device) for k, v in b.items()}
            loss = causal_lm_loss(model(**b), b)
            w = b["input_ids"].numel()
            tot, n = tot + float(loss) * w, n + w
    return math.exp(tot / max(n, 1))


def save_plain(model, save_dir) -> None:
    """``model.save_pretrained(save_dir)``; a model loaded from a GGUF file (which transformers dequantizes to
    plain tensors at load, but then refuses to serialize) is saved as the plain model it is."""
    hq = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(hq, "quantization_config", None), "quant_method", None)
    if hq is None or str(getattr(method, "value", method)) != "gguf":
        model.save_pretrained(save_dir)
        return
    cfg = model.config
    saved = (model.hf_quantizer, cfg.__dict__.get("quantization_config"))
    try:
        model.hf_quantizer = None
        cfg.__dict__.pop("quantization_config", None)
        model.save_pretrained(save_dir)
    finally:
        model.hf_quantizer = saved[0]
        if saved[1] is not None:
            cfg.quantization_config = saved[1]
