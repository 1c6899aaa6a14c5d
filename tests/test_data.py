"""Data: the three row layouts, file formats, response-only labels, truncation, the seeded split, batching."""

import hashlib
import json

import pytest

from conftest import byte_tokenizer
from peft_ila.app import UsageError
from peft_ila.app.data import (
    PLAIN_FORMAT,
    batches,
    column_mapping,
    encode,
    load_conversations,
    read_dataset,
    segments,
    split,
)

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


@pytest.mark.parametrize(
    ("columns", "given", "expected"),
    [
        (
            ["instruction", "input", "output"],
            None,
            {"instruction": "instruction", "input": "input", "output": "output"},
        ),
        (
            ["instruction", "input", "response"],
            None,
            {"instruction": "instruction", "input": "input", "output": "response"},
        ),
        (["question", "context", "answer"], None, {"instruction": "question", "input": "context", "output": "answer"}),
        (["prompt", "completion"], None, {"instruction": "prompt", "output": "completion"}),
        (["output", "response", "instruction"], None, {"instruction": "instruction", "output": "output"}),  # exact wins
        (
            ["q", "a", "sys"],
            {"prompt": "q", "response": "a", "system": "sys"},
            {"instruction": "q", "output": "a", "system": "sys"},
        ),
        (["messages", "id"], None, {"messages": "messages"}),
        (["dialog"], {"conversations": "dialog"}, {"conversations": "dialog"}),
    ],
)
def test_column_mapping_detects_common_names_and_takes_given_ones(columns, given, expected):
    assert column_mapping(columns, given) == expected


@pytest.mark.parametrize(
    ("columns", "given", "message"),
    [
        (
            ["prompt", "response", "answer"],
            None,
            "['response', 'answer'] that could each be the output; say which with --columns output=COLUMN",
        ),
        (["q", "a"], None, "not a known layout (no column for instruction or output)"),
        (["q", "a"], {"instruction": "q", "output": "nope"}, "--columns output=nope: the data has no column 'nope'"),
        (["q", "a"], {"answer": "a"}, "--columns answer=a: 'answer' is not a role"),
    ],
)
def test_column_mapping_refuses_what_it_cannot_resolve(columns, given, message):
    with pytest.raises(UsageError) as caught:
        column_mapping(columns, given)
    assert message in str(caught.value)


def test_read_dataset_records_source_fingerprint_and_row_ids(tmp_path):
    rows = [{"ask": "a", "reply": "b"}, {"ask": "c", "reply": ""}, {"ask": "d", "reply": "e"}]
    path = write(tmp_path / "x.json", rows, "json")
    dataset = read_dataset(path, {"instruction": "ask", "output": "reply"})
    assert dataset.row_ids == [0, 2] and dataset.source == str((tmp_path / "x.json").resolve())
    assert dataset.sha256 == hashlib.sha256((tmp_path / "x.json").read_bytes()).hexdigest()
    with pytest.raises(UsageError, match=r"is a directory; pass a \.json"):
        read_dataset(str(tmp_path))


# The data reader's coverage, as docs/cli.md's table gives it: each layout's row and the conversation it becomes
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
LAYOUTS = {
    "alpaca": ({"instruction": "Add.", "input": "2+2", "output": "4"}, [("user", "Add.\n\n2+2"), ("assistant", "4")]),
    "ShareGPT": (SHAREGPT, [("user", "hi"), ("assistant", "hello")]),
    "ShareGPT with tool turns": (
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": CALL},
                {"from": "observation", "value": '{"temp": 21}'},
                {"from": "gpt", "value": "21 degrees."},
            ],
            "tools": "[]",
        },
        [("user", "Weather in Paris?"), ("assistant", CALL), ("tool", '{"temp": 21}'), ("assistant", "21 degrees.")],
    ),
    "OpenAI messages with tool calls": (
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": CALL}]},
                {"role": "tool", "content": '{"temp": 21}'},
                {"role": "assistant", "content": "21 degrees."},
            ]
        },
        [
            ("user", "Weather in Paris?"),
            ("assistant", json.dumps([{"type": "function", "function": CALL}])),
            ("tool", '{"temp": 21}'),
            ("assistant", "21 degrees."),
        ],
    ),
    "Gemma's model role, bot": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]},
        [("user", "hi"), ("assistant", "hello")],
    ),
    "ShareGPT preference rows": (
        {
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "go away"},
        },
        [("user", "hi"), ("assistant", "hello")],
    ),
    "alpaca preference rows": (
        {"instruction": "Greet.", "input": "", "chosen": "hello", "rejected": "go away"},
        [("user", "Greet."), ("assistant", "hello")],
    ),
    "TRL preference rows": (
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
        [("user", "hi"), ("assistant", "hello")],
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_of_the_coverage_table_becomes_its_conversation(tmp_path, layout):
    row, expected = LAYOUTS[layout]
    dataset = read_dataset(write(tmp_path / "d.json", [row], "json"))
    assert dataset.conversations == [[{"role": role, "content": text} for role, text in expected]]
    assert dataset.dropped == {} and dataset.describe() == "1 rows -> 1 conversations (none dropped)"


def test_the_coverage_table_is_in_the_cli_docs():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    rows = [line.split("|")[1].strip() for line in docs.splitlines() if line.startswith("| ") and "->" in line]
    assert set(rows) >= {*LAYOUTS, "plain text", "other roles"}, rows


def test_rows_with_unknown_roles_are_counted_and_named(tmp_path):
    rows = [SHAREGPT, {"conversations": [{"from": "critic", "value": "no"}, {"from": "gpt", "value": "ok"}]}]
    rows += [{"conversations": [{"from": "human", "value": "hi"}]}]
    dataset = read_dataset(write(tmp_path / "d.json", rows, "json"))
    assert len(dataset.conversations) == 1 and dataset.row_ids == [0]
    assert dataset.describe() == (
        "3 rows -> 1 conversations (2 dropped: 1 with role 'critic', 1 without an assistant answer)"
    )
    with pytest.raises(UsageError, match=r"none of its 1 rows .* \(1 dropped: 1 with role 'critic'\); known roles: "):
        read_dataset(write(tmp_path / "e.json", rows[1:2], "json"))


def test_plain_text_rows_are_refused_naming_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match=r"a `text` column is plain text, with no answer to learn"):
        read_dataset(write(tmp_path / "t.json", [{"text": "Once upon a time."}], "json"))


def test_preference_rows_take_the_chosen_answer_when_mapped_by_hand(tmp_path):
    row = LAYOUTS["ShareGPT preference rows"][0]
    dataset = read_dataset(
        write(tmp_path / "d.json", [row], "json"), {"conversations": "conversations", "output": "chosen"}
    )
    assert dataset.columns == {"conversations": "conversations", "output": "chosen"} and dataset.unused == ["rejected"]
    assert dataset.conversations[0][-1] == {"role": "assistant", "content": "hello"}
    assert column_mapping(list(row)) == {"conversations": "conversations", "output": "chosen"}  # detected alike


def test_tool_turns_go_through_the_chat_template_and_are_not_trained_on():
    tokenizer = byte_tokenizer()
    conversation = [{"role": r, "content": t} for r, t in LAYOUTS["ShareGPT with tool turns"][1]]
    ((ids, labels),) = encode([conversation], tokenizer, max_length=1000).examples
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    answered = tokenizer.decode([t for t in labels if t != -100])
    assert answered == f"{CALL}<|im_end|>\n21 degrees.<|im_end|>\n"  # the call and the answer, not the tool's output
    plain = "".join(text for text, _ in segments(conversation, tokenizer, plain=True))
    assert '### Observation:\n{"temp": 21}\n\n### Response:\n21 degrees.' in plain


def test_a_chat_template_that_refuses_a_role_drops_the_row_and_says_why():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    conversation = [{"role": r, "content": t} for r, t in LAYOUTS["ShareGPT with tool turns"][1]]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    encoded = encode([conversation, plain], tokenizer, max_length=1000)
    assert len(encoded.examples) == 1 and encoded.sources == [1]
    assert encoded.refused == {"refused by the chat template (no tool role)": 1}
