class CurvatureError(RuntimeError):
    """Curvature could not be used: non-finite statistics, or a factorisation failed after the damping ladder."""


class PruningInputError(ValueError):
    """A user argument is invalid; the message names the argument. The model has not been changed."""


class TiedWeightWarning(UserWarning):
    """A pruned tensor is shared with a module that was not listed (tied embeddings): both will change."""


def check_writable(path, name: str, *, folder: bool) -> None:
    """Refuse, naming ``name``, a ``path`` that cannot be written: checked before any model loads or prunes.

    ``folder=True``: ``path`` is, or can be created as, a folder.  ``folder=False``: ``path`` is a file (not a
    folder) whose parent folder exists or can be created.  Creatable means the nearest existing ancestor is a
    writable folder."""
    import os
    from pathlib import Path
    p = Path(os.fspath(path)).absolute()
    if p.exists() and (p.is_dir() != folder):
        raise PruningInputError(f"{name}: {str(path)!r} is a {'file' if folder else 'folder'}; give a "
                                f"{'folder (created if missing)' if folder else 'file path'}")
    q = p if folder else p.parent
    while not q.exists():
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise PruningInputError(f"{name}: cannot write {str(path)!r} ({str(q)!r} is not a writable folder)")
