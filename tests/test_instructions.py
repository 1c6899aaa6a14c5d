"""The verifiable instructions: each kind's checker on hand-written answers that obey it and that do not, the draw
that attaches them to prompts, and the score with its standard error."""

import math

import pytest

from peft_ila.app.instructions import KINDS, Instruction, attach, score

CASES = [  # (instruction, answers that obey it, answers that do not)
    (Instruction("lowercase"), ["all of it is lowercase, 3 times."], ["Not all of it.", "", "123"]),
    (Instruction("uppercase"), ["ALL OF IT, 3 TIMES."], ["ALL BUT this", "42"]),
    (Instruction("max-words", 5), ["one two three four five", "Short."], ["one two three four five six", ""]),
    (Instruction("min-words", 3), ["one two three", "a b c d"], ["one two"]),
    (Instruction("no-commas"), ["No commas here."], ["One, two.", "  "]),
    (
        Instruction("ends-with", "Any questions?"),
        ["Done. Any questions?  \n"],
        ["Any questions? Yes.", "any questions?"],
    ),
    (Instruction("json"), ['{"a": 1}', '```json\n["x", 2]\n```', " 3 "], ["{'a': 1}", "The answer: {}", ""]),
    (Instruction("bullets", 2), ["Two:\n* first\n- second\n"], ["* one", "* a\n* b\n* c", "*no space\n*either"]),
    (Instruction("quoted"), ['"all of it"', '  "padded"\n'], ['"open', 'x "inner" y', '"']),
    (Instruction("title"), ["<<A Title>>\nthe text"], ["<A Title>", "<<>>", "<<two\nlines>>"]),
    (Instruction("postscript"), ["Text.\n\nP.S. one more thing"], ["Text. PS: no", "p.s. lowercase"]),
]


def test_every_kind_has_a_case():
    assert {instruction.kind for instruction, _, _ in CASES} == set(KINDS)


@pytest.mark.parametrize(("instruction", "obeying", "breaking"), CASES, ids=[c[0].kind for c in CASES])
def test_each_checker_passes_what_obeys_and_fails_what_does_not(instruction, obeying, breaking):
    assert all(instruction.holds(answer) for answer in obeying), [a for a in obeying if not instruction.holds(a)]
    assert not any(instruction.holds(answer) for answer in breaking), [a for a in breaking if instruction.holds(a)]


def test_the_instruction_text_carries_its_value_and_an_unknown_kind_is_refused():
    assert Instruction("max-words", 40).text == "Answer in at most 40 words."
    assert '"Any questions?"' in Instruction("ends-with", "Any questions?").text
    with pytest.raises(ValueError, match="'shout' is unknown; use one of lowercase"):
        Instruction("shout")


def test_attach_draws_the_same_instructions_for_the_same_seed_and_appends_their_text():
    prompts = [f"Question {i}?" for i in range(40)]
    first, again, other = attach(prompts, seed=3), attach(prompts, seed=3), attach(prompts, seed=4)
    assert first == again and first != other
    assert all(text == f"{p}\n\n{i.text}" for p, (text, i) in zip(prompts, first, strict=True))
    assert len({i.kind for _, i in first}) > len(KINDS) // 2  # 40 draws reach most kinds


def test_the_score_is_the_share_obeyed_with_its_binomial_standard_error():
    instructions = [Instruction("no-commas")] * 4
    scored = score(["a", "b", "c, d", "e"], instructions)
    assert scored["share"] == 0.75 and scored["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert scored["obeyed"] == [True, True, False, True]
    assert score(["a"], [Instruction("no-commas")]) == {"share": 1.0, "se": 0.0, "obeyed": [True]}
    with pytest.raises(ValueError, match="one instruction per answer: 2 answers, 1 given"):
        score(["a", "b"], instructions[:1])
