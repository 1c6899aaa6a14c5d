"""Data: the three row layouts, file formats, response-only labels, truncation, the seeded split, batching."""

import json

import pytest

from conftest import byte_tokenizer
from peft_ila.app import UsageError
from peft_ila.app.data import PLAIN_FORMAT, batches, encode, load_conversations, segments, split

ALPACA = {"instruction": "Add.", "input": "2+2", "output": "4", "system": "Be terse.", "history": [["hi", "hello"]]}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def write(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_alpaca_rows_with_system_history_and_input(tmp_path):
    (conv,) = load_conversations(write(tmp_path / "a.json", [ALPACA], "json"))
    assert conv == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add.\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_chat_and_sharegpt_layouts_in_every_file_format(tmp_path, fmt):
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert load_conversations(write(tmp_path / f"c.{fmt}", [CHAT, CHAT], fmt)) == [expected, expected]
    assert load_conversations(write(tmp_path / f"s.{fmt}", [SHAREGPT], fmt)) == [expected]


def test_rows_without_an_answer_are_skipped(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": ""},
        {"instruction": "d", "output": None},
    ]
    assert len(load_conversations(write(tmp_path / "x.json", rows, "json"))) == 1


def test_labels_cover_the_responses_only():
    tokenizer = byte_tokenizer()
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "sure"},
    ]
    ((ids, labels),) = encode([conversation], tokenizer, max_length=1000).examples
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    answered = tokenizer.decode([t for t in labels if t != -100])
    assert answered == "yo<|im_end|>\nsure<|im_end|>\n"


def test_plain_format_without_a_chat_template():
    tokenizer = byte_tokenizer(chat_template=False)
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert segments(conversation, tokenizer) == [
        ("S\n\n" + PLAIN_FORMAT.format(user="Q"), False),
        ("A<|im_end|>\n\n", True),
    ]


def test_truncate_or_drop_overlong_examples():
    tokenizer = byte_tokenizer()
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 50}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]
    truncated = encode([long, short], tokenizer, max_length=40)
    assert (truncated.truncated, truncated.dropped, len(truncated.examples)) == (1, 0, 2)
    assert len(truncated.examples[0][0]) == 40 and truncated.sources == [0, 1]
    dropped = encode([long, short], tokenizer, max_length=40, overlong="drop")
    assert (dropped.dropped, dropped.sources) == (1, [1])
    prompt_only = encode([long], tokenizer, max_length=10)  # no response token survives: dropped
    assert prompt_only.dropped == 1 and not prompt_only.examples


def test_split_is_seeded_and_disjoint():
    train, held = split(list(range(100)), 10, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split(list(range(100)), 10, seed=3) == (train, held) and split(list(range(100)), 10, seed=4)[1] != held
    with pytest.raises(UsageError, match="--eval-size 100 must be between 1 and 99"):
        split(list(range(100)), 100, seed=0)


def test_batches_pad_right_and_mask_padding():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4], [4])]
    (batch,) = list(batches(examples, batch_size=2, pad_id=0, shuffle=False))
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
