class CurvatureError(RuntimeError):
    """Curvature could not be used: non-finite statistics, or a factorisation failed after the damping ladder."""


class PruningInputError(ValueError):
    """A user argument is invalid; the message names the argument. The model has not been changed."""


class TiedWeightWarning(UserWarning):
    """A pruned tensor is shared with a module that was not listed (tied embeddings): both will change."""


class UnprunedWeightsWarning(UserWarning):
    """A default selection of Linear/Conv layers left out weight tensors no such layer holds (Mixture-of-Experts
    experts stored as 3-D tensors, non-Linear routers, ``nn.MultiheadAttention.in_proj_weight``): they stay dense."""


def check_writable(path, name: str, *, folder: bool, stem: bool = False) -> None:
    """Refuse, naming ``name``, a ``path`` that cannot be written: checked before any model loads or prunes.

    ``folder=True``: ``path`` is, or can be created as, a folder.  ``folder=False``: ``path`` is a file (not a
    folder, no trailing separator; writable if it exists) whose parent folder exists or can be created;
    ``stem=True``: a prefix that files such as ``<path>.json`` are written beside (only its parent matters).
    Creatable means the nearest existing ancestor is a writable folder."""
    import os
    from pathlib import Path
    raw = os.fspath(path)
    if not folder and raw.endswith((os.sep, "/")):
        raise PruningInputError(f"{name}: {raw!r} ends with a path separator; give a file path")
    p = Path(raw).absolute()
    if not stem and p.exists() and (p.is_dir() != folder):
        raise PruningInputError(f"{name}: {raw!r} is a {'file' if folder else 'folder'}; give a "
                                f"{'folder (created if missing)' if folder else 'file path'}")
    if not folder and not stem and p.is_file() and not os.access(p, os.W_OK):
        raise PruningInputError(f"{name}: cannot write {raw!r} (the file exists and is read-only)")
    q = p if folder else p.parent
    while not q.exists():
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise PruningInputError(f"{name}: cannot write {raw!r} ({str(q)!r} is not a writable folder)")
