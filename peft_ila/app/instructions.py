"""Verifiable instructions: an instruction-following score without a judge.

Each `Instruction` is a constraint attached to a prompt (a word limit, all lowercase, a JSON answer, a fixed closing
phrase, no commas, a number of bullet points, ...) whose answer a rule checks: no model and no downloaded data.
`attach` gives held-out prompts one instruction each, drawn with a seed; `score` is the share of answers that obey
theirs, with its standard error; an `InstructionProbe` holds such prompts ready to prompt a model with, and scores its
greedy answers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import Conversation, prompt_text

PROMPT_TOKENS = 128  # the longest prompt (chat template applied, before its instruction) an `InstructionProbe` takes
PHRASES = ("Is there anything else I can help with?", "Let me know if you have more questions.")


def _words(answer: str) -> int:
    """How many words: runs of letters, digits or underscores ("don't" is two)."""
    return len(re.findall(r"\b\w+\b", answer))


def _bullets(answer: str) -> int:
    """How many lines are Markdown bullet points ("* item" or "- item")."""
    return len(re.findall(r"^\s*[*-]\s+\S", answer, re.MULTILINE))


def _is_json(answer: str) -> bool:
    """Whether the answer, outside an optional ```json fence, parses as JSON."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", answer.strip(), flags=re.IGNORECASE)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# kind -> (the instruction's text, with {value}; whether an answer obeys it, given the value)
KINDS: dict[str, tuple[str, Callable[[str, object], bool]]] = {
    "lowercase": (
        "Write your whole answer in lowercase letters: no capital letter at all.",
        lambda answer, _: any(c.isalpha() for c in answer) and answer == answer.lower(),
    ),
    "uppercase": (
        "Write your whole answer in capital letters.",
        lambda answer, _: any(c.isalpha() for c in answer) and answer == answer.upper(),
    ),
    "max-words": ("Answer in at most {value} words.", lambda answer, n: 0 < _words(answer) <= n),
    "min-words": ("Answer in at least {value} words.", lambda answer, n: _words(answer) >= n),
    "no-commas": (
        "Do not use any commas in your answer.",
        lambda answer, _: bool(answer.strip()) and "," not in answer,
    ),
    "ends-with": (
        'Finish your answer with the exact phrase "{value}"; nothing may follow it.',
        lambda answer, phrase: answer.strip().endswith(phrase),
    ),
    "json": ("Give your whole answer as valid JSON (you may put it in a ```json block).", lambda a, _: _is_json(a)),
    "bullets": (
        "Answer with exactly {value} bullet points, each a line starting with '* '.",
        lambda answer, n: _bullets(answer) == n,
    ),
    "quoted": (
        "Wrap your whole answer in double quotation marks.",
        lambda answer, _: len(answer.strip()) > 1 and answer.strip()[0] == answer.strip()[-1] == '"',
    ),
    "title": (
        "Give your answer a title in double angle brackets, such as <<a title>>.",
        lambda answer, _: re.search(r"<<[^<>\n]+>>", answer) is not None,
    ),
    "postscript": (
        "End your answer with a postscript starting with P.S.",
        lambda answer, _: re.search(r"^\s*P\.S\.", answer, re.MULTILINE) is not None,
    ),
}


@dataclass(frozen=True)
class Instruction:
    """A verifiable constraint: its `kind` (a key of `KINDS`) and `value` (a word count, a phrase; None when the kind
    takes none)."""

    kind: str
    value: int | str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Instruction kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}.")

    @property
    def text(self) -> str:
        """The sentence that asks for it, as appended to a prompt."""
        return KINDS[self.kind][0].format(value=self.value)

    def holds(self, answer: str) -> bool:
        """Whether `answer` obeys the instruction."""
        return bool(KINDS[self.kind][1](answer, self.value))


def draw(rng: random.Random) -> Instruction:
    """One instruction of a uniformly drawn kind, with a value drawn where the kind takes one."""
    kind = rng.choice(sorted(KINDS))
    values = {
        "max-words": lambda: rng.choice((20, 40, 60)),
        "min-words": lambda: rng.choice((50, 80)),
        "ends-with": lambda: rng.choice(PHRASES),
        "bullets": lambda: rng.choice((2, 3, 4)),
    }
    return Instruction(kind, values[kind]() if kind in values else None)


def attach(prompts: list[str], seed: int = 0) -> list[tuple[str, Instruction]]:
    """Each prompt with an instruction drawn for it (`seed`: the same prompts get the same instructions), the
    instruction's sentence appended after a blank line."""
    rng = random.Random(seed)
    drawn = [draw(rng) for _ in prompts]
    return [
        (f"{prompt}\n\n{instruction.text}", instruction) for prompt, instruction in zip(prompts, drawn, strict=True)
    ]


def score(answers: list[str], instructions: list[Instruction]) -> dict:
    """{share of `answers` that obey their instructions, se: its binomial standard error sqrt(p (1 - p) / n),
    obeyed: one verdict per answer}."""
    if not answers or len(answers) != len(instructions):
        raise ValueError(f"score needs one instruction per answer: {len(answers)} answers, {len(instructions)} given.")
    obeyed = [instruction.holds(answer) for answer, instruction in zip(answers, instructions, strict=True)]
    share = sum(obeyed) / len(obeyed)
    return {"share": share, "se": math.sqrt(share * (1 - share) / len(obeyed)), "obeyed": obeyed}


@dataclass
class InstructionProbe:
    """Prompts with an instruction each, as the model is prompted (`texts`: chat template applied), to score a
    model's greedy answers by: at most `max_new_tokens` tokens each (enough for the longest a kind asks, 80 words),
    generated `batch_size` prompts at a time."""

    texts: list[str]
    instructions: list[Instruction]
    tokenizer: object
    max_new_tokens: int = 160
    batch_size: int = 16

    @classmethod
    def of(cls, sources: list[list[Conversation]], tokenizer, plain: bool, count: int, seed: int = 0, **shape):
        """`count` prompts, an even share from each of `sources` (conversations held out from training): the first
        user turns, in order, whose prompt is at most `PROMPT_TOKENS` tokens (fewer when fewer qualify), each with an
        instruction drawn with `seed`."""
        prompts = []
        for number, conversations in enumerate(sources):
            share = count // len(sources) + (number < count % len(sources))
            turns = (next((m["content"] for m in c if m["role"] == "user"), None) for c in conversations)
            fit = (t for t in turns if t and len(tokenizer(_as_prompt(t, tokenizer, plain)).input_ids) <= PROMPT_TOKENS)
            prompts += list(itertools.islice(fit, share))
        attached = attach(prompts, seed)
        texts = [_as_prompt(text, tokenizer, plain) for text, _ in attached]
        return cls(texts, [instruction for _, instruction in attached], tokenizer, **shape)

    def identity(self) -> dict:
        """What a score depends on besides the model: the prompts and instructions (SHA-256), their number, the
        answers' length cap."""
        listed = json.dumps([[t, i.kind, i.value] for t, i in zip(self.texts, self.instructions, strict=True)])
        digest = hashlib.sha256(listed.encode()).hexdigest()
        return {"prompts_sha256": digest, "prompts": len(self.texts), "max_new_tokens": self.max_new_tokens}

    def score(self, model: torch.nn.Module) -> dict:
        """`model`'s greedy answers scored: {share obeyed, se (binomial), obeyed: one bool per prompt}."""
        answers = greedy_answers(model, self.tokenizer, self.texts, self.max_new_tokens, self.batch_size)
        return score(answers, self.instructions)


def _as_prompt(turn: str, tokenizer, plain: bool) -> str:
    """The text a model continues to answer a user turn (the data's chat template or plain format)."""
    return prompt_text([{"role": "user", "content": turn}, {"role": "assistant", "content": ""}], tokenizer, plain)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Each text's greedy continuation (at most `max_new_tokens` tokens, up to the end-of-sequence token), decoded
    without special tokens; prompts of like length batched together, left-padded."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = [""] * len(texts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        device = next(model.parameters()).device
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt")
            greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out = model.generate(**encoded.to(device), **greedy)
            width = encoded["input_ids"].shape[1]
            for i, row in zip(batch, out, strict=True):
                answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return answers
