"""Alignment data: load conversations, format them with the chat template, tokenize with response-only labels,
split off a seeded held-out set, and batch.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Loss counts the assistant
tokens only (labels are -100 elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import UsageError, cache_dir

ALPACA_DEMO = "alpaca_en_demo"
ALPACA_DEMO_SOURCE = "llamafactory==0.9.5"  # its PyPI sdist ships data/alpaca_en_demo.json (999 pairs)
PLAIN_FORMAT = "### Instruction:\n{user}\n\n### Response:\n"  # used when the tokenizer has no chat template
PLAIN_TOOL_FORMAT = "### Observation:\n{tool}\n\n### Response:\n"  # a tool's answer, in that format
Conversation = list[dict[str, str]]


def fetch_alpaca_demo() -> Path:
    """The cached alpaca_en_demo.json, fetched once from the llamafactory sdist on PyPI."""
    target = cache_dir() / "data" / f"{ALPACA_DEMO}.json"
    if target.exists():
        return target
    print(f"Fetching {ALPACA_DEMO}.json from the PyPI sdist of {ALPACA_DEMO_SOURCE} into {target} (once) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", ALPACA_DEMO_SOURCE]
        done = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise UsageError(
                f"could not download {ALPACA_DEMO_SOURCE} from PyPI ({done.stderr.strip()[-200:]}); check network "
                "access to PyPI, or pass --data with a local json/jsonl/parquet file."
            )
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(f"/data/{ALPACA_DEMO}.json")), None)
            if member is None:
                raise UsageError(f"{sdists[0].name} has no data/{ALPACA_DEMO}.json; pass --data with a local file.")
            partial = Path(tmp) / "partial.json"
            partial.write_bytes(tar.extractfile(member).read())
        os.replace(partial, target)
    return target


@dataclass
class Dataset:
    """Conversations read from a dataset, and what identifies them."""

    conversations: list[Conversation]
    row_ids: list[int]  # the row of each conversation in the source (rows without one are skipped)
    source: str  # `alpaca_en_demo`, a dataset name in the local cache, or the absolute path of a file
    sha256: str  # of the file's bytes; of the rows as canonical JSON for a dataset from the cache
    columns: dict[str, str]  # role -> column, as used
    rows: int = 0  # rows read
    dropped: dict[str, int] = field(default_factory=dict)  # rows skipped, by reason
    unused: list[str] = field(default_factory=list)  # columns of the first row no role reads (`rejected`, `tools`)

    def describe(self) -> str:
        """E.g. "300 rows -> 147 conversations (153 dropped: 150 with role 'x', 3 without an assistant answer)"."""
        return f"{self.rows} rows -> {len(self.conversations)} conversations ({dropped_text(self.dropped)})"


def dropped_text(dropped: dict[str, int]) -> str:
    """E.g. "none dropped", or "153 dropped: 150 with role 'x', 3 without an assistant answer" (most first)."""
    if not dropped:
        return "none dropped"
    reasons = sorted(dropped.items(), key=lambda item: -item[1])
    return f"{sum(dropped.values())} dropped: " + ", ".join(f"{n} {reason}" for reason, n in reasons)


def _data_file(spec: str) -> Path | None:
    """The local file a dataset spec names (the embedded default is fetched once), or None for a name to look up in
    the local `datasets` cache."""
    path = fetch_alpaca_demo() if spec == ALPACA_DEMO else Path(spec).expanduser()
    if path.is_dir():
        raise UsageError(f"--data {spec} is a directory; pass a .json, .jsonl or .parquet file.")
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise UsageError(f"data file {path} does not exist; pass --data with an existing json/jsonl/parquet file.")
        return path
    if path.exists():
        raise UsageError(f"{path} is not a .json, .jsonl or .parquet file; convert it or pass one of those.")
    return None


def fingerprint(spec: str) -> tuple[str, str]:
    """Where a dataset spec resolves to and the SHA-256 of its content (see `Dataset.source`, `Dataset.sha256`)."""
    path = _data_file(spec)
    if path is None:
        _, source, sha256 = _rows(spec)
        return source, sha256
    return _file_identity(spec, path)


def _file_identity(spec: str, path: Path) -> tuple[str, str]:
    return (spec if spec == ALPACA_DEMO else str(path.resolve())), file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rows(spec: str) -> tuple[list[dict], str, str]:
    """Rows of a dataset (the embedded default, a local json/jsonl/parquet file, or a cached `datasets` name), where
    they came from and their SHA-256 (see `fingerprint`)."""
    import datasets

    path = _data_file(spec)
    if path is None:
        try:
            rows = datasets.load_dataset(spec, split="train").to_list()
        except Exception:
            raise UsageError(
                f"--data {spec!r} is neither a local .json/.jsonl/.parquet file nor a dataset in the local datasets "
                f"cache (nothing is downloaded from the hub); pass a local file, or {ALPACA_DEMO!r}."
            ) from None
        return rows, spec, hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    source, sha256 = _file_identity(spec, path)
    builder = "parquet" if path.suffix == ".parquet" else "json"
    if builder == "json" and path.stat().st_size <= 64 and path.read_bytes().strip() in (b"", b"[]", b"{}"):
        return [], source, sha256  # datasets reports an empty file obscurely
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list(), source, sha256
    except Exception as exc:  # datasets raises many types for unreadable files
        raise UsageError(f"cannot read {path} as {builder}: {str(exc).splitlines()[0]}") from None


ROLES = ("system", "user", "assistant", "tool")  # a conversation's roles; "tool": a tool's answer (not trained on)
ROLE_NAMES = {  # what datasets call them: ShareGPT's `from`, chat `role`s (Gemma's "model"), tool turns
    **{name: "user" for name in ("user", "human")},
    **{name: "assistant" for name in ("assistant", "gpt", "model", "bot", "chatgpt", "function_call")},
    **{name: "tool" for name in ("tool", "observation", "function", "ipython")},
    "system": "system",
}


def _turn(turn, role: str) -> dict:
    """One message from a turn: {"role", "content"} or ShareGPT's {"from", "value"} (its role given by name, see
    ROLE_NAMES; an unknown name is kept, to be reported), or a bare string said by `role`. An assistant turn holding
    only OpenAI `tool_calls` says them as JSON."""
    if isinstance(turn, str):
        return {"role": role, "content": turn}
    name = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if content is None and turn.get("tool_calls"):
        content = json.dumps(turn["tool_calls"], ensure_ascii=False)
    return {"role": ROLE_NAMES.get(name, name), "content": content}


def _turns(value, role: str) -> Conversation:
    """The messages of a column's value: a list of turns, one turn, or a string said by `role`."""
    return [_turn(t, role) for t in value] if isinstance(value, list) else [_turn(value, role)]


def _from_alpaca(row: dict, columns: dict[str, str]) -> Conversation:
    def get(role: str):
        return row.get(columns[role]) if role in columns else None

    messages = [{"role": "system", "content": get("system")}] if get("system") else []
    for user, assistant in get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    instruction = get("instruction")
    if isinstance(instruction, str):
        messages.append({"role": "user", "content": instruction + (f"\n\n{get('input')}" if get("input") else "")})
    else:  # a preference row's prompt as messages (TRL's conversational format)
        messages += _turns(instruction, "user")
    return messages + _turns(get("output"), "assistant")


def _from_turns(row: dict, columns: dict[str, str]) -> Conversation:
    """Chat `messages` or ShareGPT `conversations`, then the `output` column's answer if mapped (a preference row's
    `chosen`)."""
    chat = next(role for role in CHAT_ROLES if role in columns)
    messages = _turns(row[columns[chat]], "user")
    return messages + (_turns(row[columns["output"]], "assistant") if "output" in columns else [])


def _problem(conversation: Conversation) -> str | None:
    """Why a conversation cannot train (a reason for the data line), or None."""
    unknown = sorted({str(m["role"]) for m in conversation if m["role"] not in ROLES})
    if unknown:
        return f"with role {', '.join(repr(r) for r in unknown)}"
    if not all(isinstance(m["content"], str) for m in conversation):
        return "with a turn that is not text"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in conversation):
        return "without an assistant answer"
    return None


ALPACA_ROLES = ("instruction", "input", "output", "system", "history")
CHAT_ROLES = ("messages", "conversations")
ROLE_ALIASES = {"prompt": "instruction", "query": "input", "response": "output"}  # LLaMA-Factory's names
DETECTED = {  # the column names each alpaca role is recognised by, its own name first (`chosen`: preference rows)
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion", "chosen"),
    "system": ("system",),
    "history": ("history",),
}


def column_mapping(columns: list[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """role -> column for rows with `columns`: the `given` roles (`--columns`), the others detected by name when
    unambiguous. Alpaca roles when `instruction` and `output` resolve, else `messages` or `conversations`."""
    given = {ROLE_ALIASES.get(role, role): column for role, column in (given or {}).items()}
    for role, column in given.items():
        if role not in ALPACA_ROLES + CHAT_ROLES:
            raise UsageError(
                f"--columns {role}={column}: {role!r} is not a role; use instruction (alias prompt), input (query), "
                "output (response), system, history, messages or conversations."
            )
        if column not in columns:
            raise UsageError(f"--columns {role}={column}: the data has no column {column!r}; its columns: {columns}.")
    chat = [role for role in CHAT_ROLES if role in given]
    if chat:  # with an `output` given too, that column's answer follows the turns
        return {chat[0]: given[chat[0]], **({"output": given["output"]} if "output" in given else {})}
    mapping, ambiguous = {}, {}
    for role in ALPACA_ROLES:
        taken = set(given.values()) | set(mapping.values())
        found = [c for c in DETECTED[role] if c in columns and c not in taken]
        if role in given:
            mapping[role] = given[role]
        elif found and (found[0] == role or len(found) == 1):
            mapping[role] = found[0]
        elif found:
            ambiguous[role] = found
    if {"instruction", "output"} <= mapping.keys():
        return mapping
    for role in CHAT_ROLES:
        if role in columns and not given:  # preference rows: the turns, then the chosen answer
            return {role: role, **({"output": "chosen"} if "chosen" in columns else {})}
    needed = [role for role in ("instruction", "output") if role not in mapping]
    if any(role in ambiguous for role in needed):
        role = next(role for role in needed if role in ambiguous)
        raise UsageError(
            f"--data has columns {ambiguous[role]} that could each be the {role}; say which with --columns "
            f"{role}=COLUMN."
        )
    if "text" in columns and not given:
        raise UsageError(
            f"--data has columns {columns}: a `text` column is plain text, with no answer to learn; the loss counts "
            "answers only. Use alpaca, chat `messages` or ShareGPT `conversations` rows, or map yours with --columns."
        )
    raise UsageError(
        f"--data has columns {columns}: not a known layout (no column for {' or '.join(needed)}). Map yours with "
        "--columns, e.g. --columns instruction=question,output=answer, or use alpaca instruction/input/output, chat "
        "`messages` [{role, content}], or ShareGPT `conversations` [{from, value}]."
    )


def read_dataset(spec: str, columns: dict[str, str] | None = None) -> Dataset:
    """Conversations from alpaca-like rows (`instruction`/`input`/`output`[/`history`/`system`], or the columns that
    `columns` or their names say hold these), chat (`messages`) or ShareGPT (`conversations`) rows, tool turns
    included, and preference rows (their `chosen` answer); rows that do not make a conversation with an assistant
    answer are skipped and counted by reason (`Dataset.dropped`)."""
    rows, source, sha256 = _rows(spec)
    if not rows:
        raise UsageError(f"--data {spec} has no rows; pass a file with at least one example.")
    mapping = column_mapping(list(rows[0]), columns)
    convert = _from_turns if any(role in mapping for role in CHAT_ROLES) else _from_alpaca
    conversations, row_ids, dropped = [], [], Counter()
    for index, row in enumerate(rows):
        try:
            conversation = convert(row, mapping)
            problem = _problem(conversation)
        except (KeyError, TypeError, ValueError, AttributeError):
            problem = "not in the layout of the first row"
        if problem is None:
            conversations.append(conversation)
            row_ids.append(index)
        else:
            dropped[problem] += 1
    unused = [column for column in rows[0] if column not in mapping.values()]
    dataset = Dataset(conversations, row_ids, source, sha256, mapping, len(rows), dict(dropped), unused)
    if not conversations:
        raise UsageError(
            f"--data {spec}: none of its {len(rows)} rows holds a usable conversation ({dropped_text(dropped)}); "
            f"known roles: {', '.join(ROLE_NAMES)}. Map the columns with --columns ROLE=COLUMN."
        )
    return dataset


def load_conversations(spec: str, columns: dict[str, str] | None = None) -> list[Conversation]:
    """The conversations of `read_dataset`."""
    return read_dataset(spec, columns).conversations


def segments(conversation: Conversation, tokenizer, plain: bool = False) -> list[tuple[str, bool]]:
    """The conversation as text pieces, each marked True if it is response text the loss should count.

    With a chat template the pieces come from `apply_chat_template` (the assistant piece includes its end-of-turn
    marker); without one (or `plain=True`) from PLAIN_FORMAT, the response followed by the eos token.
    """
    if plain or not tokenizer.chat_template:
        system = "".join(m["content"] + "\n\n" for m in conversation if m["role"] == "system")
        pieces, prompt = [], system
        for m in conversation:
            if m["role"] == "user":
                prompt += PLAIN_FORMAT.format(user=m["content"])
            elif m["role"] == "tool":
                prompt += PLAIN_TOOL_FORMAT.format(tool=m["content"])
            elif m["role"] == "assistant":
                pieces += [(prompt, False), (m["content"] + (tokenizer.eos_token or "") + "\n\n", True)]
                prompt = ""
        return pieces
    pieces, done = [], ""
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(conversation[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UsageError("the tokenizer's chat template does not extend its own prefix; pass --plain-format.")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def prompt_text(conversation: Conversation, tokenizer, plain: bool = False) -> str:
    """The text a model continues to answer the conversation's first assistant turn."""
    return segments(conversation, tokenizer, plain)[0][0]


@dataclass
class Encoded:
    """Token examples (input_ids, labels) and what happened on the way."""

    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # conversation index of each example
    truncated: int = 0
    dropped: int = 0  # longer than the maximum length (see `encode`)
    prompt_too_long: int = 0  # of those, how many had no answer token within it
    refused: dict[str, int] = field(default_factory=dict)  # conversations the chat template cannot render, by error


def encode(
    conversations: list[Conversation], tokenizer, max_length: int, overlong: str = "truncate", plain: bool = False
) -> Encoded:
    """Tokenize; examples longer than `max_length` are truncated (kept if a response token survives) or dropped.
    A conversation the chat template refuses (a role it has no place for, say) is dropped and counted."""
    out = Encoded()
    refused = Counter()
    for index, conversation in enumerate(conversations):
        ids, labels = [], []
        try:
            pieces = segments(conversation, tokenizer, plain)
        except UsageError:
            raise
        except Exception as exc:  # jinja's TemplateError, or what a template raises itself
            refused[f"refused by the chat template ({str(exc).splitlines()[0]})"] += 1
            continue
        for text, is_response in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if is_response else [-100] * len(piece)
        if len(ids) > max_length:
            unanswered = all(t == -100 for t in labels[:max_length])
            if overlong == "drop" or unanswered:
                out.dropped += 1
                out.prompt_too_long += unanswered
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        out.examples.append((ids, labels))
        out.sources.append(index)
    out.refused = dict(refused)
    return out


def split(examples: list, eval_size: int, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then (train, held-out) with `eval_size` held-out examples."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if not 0 < eval_size < len(examples):
        raise UsageError(f"--eval-size {eval_size} must be between 1 and {len(examples) - 1} (the usable examples).")
    held_out = [examples[i] for i in order[:eval_size]]
    return [examples[i] for i in order[eval_size:]], held_out


def batches(examples: list, batch_size: int, pad_id: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A re-iterable of padded batches (right padding; labels -100 and attention 0 on padding)."""

    def collate(items):
        width = max(len(ids) for ids, _ in items)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in items:
            pad = width - len(ids)
            out["input_ids"].append(ids + [pad_id] * pad)
            out["attention_mask"].append([1] * len(ids) + [0] * pad)
            out["labels"].append(labels + [-100] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
