"""What every benchmark script here repeats: thread settings, the command line that reproduces a run, wall-clock
timing, writing the results table (.md) and data (.json), and a matplotlib figure (Agg) saved beside them.

    from _common import Stopwatch, add_threads_argument, command_line, pyplot, save_figure, set_threads, \
        write_results
    add_threads_argument(ap)                  # --threads, default 1 (the machine is shared)
    args = ap.parse_args(); set_threads(args.threads)
    sw = Stopwatch()                          # or: with Stopwatch() as sw: ...
    rows = run(...)
    md, js = write_results(args.out, lines, {"rows": rows, "command": command_line(), "wall_s": sw.seconds})
    plt = pyplot(); fig, ax = plt.subplots(); ...; save_figure(fig, args.out + ".png")

Run a script as ``python benchmarks/<name>.py`` or ``obs-prune bench <name>``: both put this folder on
``sys.path``, so ``import _common`` finds this file.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path


def add_threads_argument(ap, default: int = 1, help: str | None = None) -> None:
    """``--threads`` (default 1: the machine is shared; raise it on your own)."""
    ap.add_argument("--threads", type=int, default=default,
                    help=help or f"torch intra-op threads (default {default})")


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (call once, before any work)."""
    import torch
    torch.set_num_threads(n)


def command_line(script: str | None = None) -> str:
    """The shell command that reproduces this run: ``python benchmarks/<script> <arguments>``."""
    script = script or f"benchmarks/{Path(sys.argv[0]).name}"
    return shlex.join(["python", script, *sys.argv[1:]])


class Stopwatch:
    """Wall-clock seconds (``time.perf_counter``) since it was made, or of its ``with`` block; ``seconds`` also
    reads while it runs."""

    def __init__(self):
        self.start, self.end = time.perf_counter(), None

    def __enter__(self):
        self.start, self.end = time.perf_counter(), None
        return self

    def __exit__(self, *exc):
        self.end = time.perf_counter()
        return False

    @property
    def seconds(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start


def _stem(stem) -> str:
    stem = str(stem)
    for suf in (".md", ".json", ".png"):
        stem = stem.removesuffix(suf)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    return stem


def write_results(stem, markdown, data: dict | None = None, *, indent: int = 1) -> tuple[str, str | None]:
    """Write ``<stem>.md`` (``markdown``: a string or a list of lines) and, if ``data`` is given,
    ``<stem>.json`` (non-JSON values written with ``str``); the folder is created.  Returns both paths."""
    stem = _stem(stem)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown)
    with open(stem + ".md", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    if data is None:
        return stem + ".md", None
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=indent, default=str)
    return stem + ".md", stem + ".json"


def emit(lines: list[str], out=None) -> None:
    """Print a results table and, when ``out`` is given, write it to ``<out>.md`` too (scripts that only read
    earlier runs' JSON)."""
    if out:
        write_results(out, lines)
    print("\n".join(lines))


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 120) -> str:
    """``tight_layout``, save ``fig`` to ``path`` (folder created) and close it; returns the path."""
    import matplotlib.pyplot as plt
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
