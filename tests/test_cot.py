"""Tests for train/cot.py: exemplar files, prompt format, answer extraction, self-consistency."""

import json

import pytest

from train import cot, data

GSM8K_LINES = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------
# Exemplar files


@pytest.mark.timeout(60)
def test_load_gsm8k_strips_annotations(tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [GSM8K_LINES[0], "", GSM8K_LINES[1]])
    first, second = cot.load_exemplars(path)
    assert first == cot.Exemplar(
        question=GSM8K_LINES[0]["question"],
        rationale="Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.",
        answer="72",
    )
    assert second.rationale == "Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10."
    assert second.answer == "10"
    assert cot.parse_gsm8k_answer("So 1,000 in all.\n#### 1,000\n") == ("So 1,000 in all.", "1000")


@pytest.mark.timeout(60)
def test_load_loom_format(tmp_path):
    rows = [{"question": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5"},
            {"question": "Half of 7?", "rationale": "7 / 2 = 3.5.", "answer": 3.5}]
    assert cot.load_exemplars(write_lines(tmp_path / "x.jsonl", rows)) == [
        cot.Exemplar("What is 2 + 3?", "2 + 3 = 5.", "5"),
        cot.Exemplar("Half of 7?", "7 / 2 = 3.5.", "3.5"),
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"question": "q", "answer": "no final line"', "malformed JSON"),
        ('["question", "answer"]', "expected a JSON object, got list"),
        ('{"question": "q", "answer": "six"}', "no final '#### N' line"),
        ('{"answer": "#### 3"}', "'question'"),
        ('{"question": "q", "rationale": "r"}', "'answer'"),
        ('{"question": "q", "rationale": 3, "answer": "3"}', "'rationale' must be a string"),
    ],
)
@pytest.mark.timeout(60)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [GSM8K_LINES[0], "", bad, GSM8K_LINES[1]])
    with pytest.raises(ValueError) as info:
        cot.load_exemplars(path)
    assert str(info.value).startswith(f"{path}, line 3: ")
    assert message in str(info.value)


@pytest.mark.timeout(60)
def test_empty_or_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no exemplars"):
        cot.load_exemplars(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        cot.load_exemplars(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------
# Prompts

EXEMPLARS = [
    cot.Exemplar("Roger has 5 balls. He buys 2 more. How many does he have?", "5 + 2 = 7.", "7"),
    cot.Exemplar("There are 3 cars and 2 leave. How many are left?", "3 - 2 = 1.", "1"),
]


@pytest.mark.timeout(60)
def test_prompt_format_cot_and_standard():
    question = "Tom has 4 pens and loses 1. How many are left?"
    assert cot.build_prompt(EXEMPLARS, question) == (
        "Q: Roger has 5 balls. He buys 2 more. How many does he have?\nA: 5 + 2 = 7. The answer is 7.\n\n"
        "Q: There are 3 cars and 2 leave. How many are left?\nA: 3 - 2 = 1. The answer is 1.\n\n"
        "Q: Tom has 4 pens and loses 1. How many are left?\nA:"
    )
    assert cot.build_prompt(EXEMPLARS, question, chain_of_thought=False) == (
        "Q: Roger has 5 balls. He buys 2 more. How many does he have?\nA: The answer is 7.\n\n"
        "Q: There are 3 cars and 2 leave. How many are left?\nA: The answer is 1.\n\n"
        "Q: Tom has 4 pens and loses 1. How many are left?\nA:"
    )
    assert cot.build_prompt([], question) == "Q: Tom has 4 pens and loses 1. How many are left?\nA:"


@pytest.mark.timeout(60)
def test_prompt_compact_corpus_matches_problem_text():
    shots = data.heldout_problems(3, 2)
    query = data.heldout_problems(2, 1)[0]
    assert cot.as_exemplar(data.Problem("Q:7+3\nA:", "+3=10.The answer is 10.", "The answer is 10.", 10, 1)) == (
        cot.Exemplar("7+3", "+3=10.", "10")
    )
    for chain_of_thought, variant in ((True, "cot"), (False, "direct")):
        prompt = cot.build_prompt(shots, query, chain_of_thought=chain_of_thought, compact=True)
        assert prompt == "".join(p.prompt + p.completion(variant) + "\n\n" for p in shots) + query.prompt
    assert cot.build_prompt([], query, compact=True) == query.prompt
    with pytest.raises(TypeError, match="Exemplar or a train.data.Problem"):
        cot.build_prompt([("q", "a")], "q")


# ---------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("So she has $1,234 left. The answer is $1,234.", "1234", "1234"),
        ("It drops by 3.5 degrees. The answer is -3.5.", "-3.5", "-3.5"),
        ("The answer is 12.0 apples, not 13", "12", "13"),
        ("The answer is 8. Q: next question has 99 eggs", "8", "99"),
        ("First The answer is 4. Then The answer is 5.", "4", "5"),
        ("We get 10-3=7, so about 7.", None, "7"),
        ("No numbers here.", None, None),
        ("", None, None),
        ("+3=10*2=20/2=10%5=0.The answer is 0.", "0", "0"),
        ("She owes -$5.", None, "-5"),
        # A minus right after a digit, letter or ')' is subtraction, not a sign.
        ("We compute 10-3", None, "3"),
        ("so (4+6)-2", None, "2"),
        ("x-1 and y-2", None, "2"),
        ("The total is -3", None, "-3"),
        ("so x = -12", None, "-12"),
        ("(-4)", None, "-4"),
        ("It costs $-5 now.", None, "-5"),
        ("The answer is -7. Not 8-7", "-7", "7"),
    ],
)
@pytest.mark.timeout(60)
def test_extraction(text, strict, flexible):
    assert cot.extract_strict(text) == strict
    assert cot.extract_flexible(text) == flexible


@pytest.mark.timeout(60)
def test_normalize_and_match():
    cases = {"$1,234.": "1234", "12.0": "12", "-12.50": "-12.5", "007": "7", "-0.0": "0", " 42 ": "42", ".5": "0.5"}
    for raw, canonical in cases.items():
        assert cot.normalize_number(raw) == canonical
    assert cot.normalize_number("seven.") == "seven"
    assert cot.answers_match("12.0", "12") and cot.answers_match("12", 12) and cot.answers_match("$1,000", "1000")
    assert not cot.answers_match("12.5", "12") and not cot.answers_match(None, "12")


@pytest.mark.timeout(60)
def test_majority_vote_ties_and_nones():
    assert cot.majority_vote(["3", None, "5", "5", None, None]) == "5"  # None is never a candidate
    assert cot.majority_vote(["5", "3", "3", "5"]) == "5"  # tie: first occurrence wins
    assert cot.majority_vote([None, "3", "5", "5", "3"]) == "3"
    assert cot.majority_vote(["12", "7", "12.0", "7"]) == "12"  # votes are compared normalized (12 twice)
    assert cot.majority_vote([None, None]) is None
    assert cot.majority_vote([]) is None


# ---------------------------------------------------------------------------------------------
# Self-consistency


def scripted(samples):
    """A generate_fn returning fixed completions per prompt, recording its calls."""
    calls = []

    def generate_fn(prompts, num_samples):
        calls.append((list(prompts), num_samples))
        return [samples[p][:num_samples] for p in prompts]

    generate_fn.calls = calls
    return generate_fn


@pytest.mark.timeout(60)
def test_self_consistency_known_scores():
    samples = {
        # first sample wrong, majority right
        "p1": ["So 5. The answer is 5.", "The answer is 6.", "Then 6 The answer is $6.", "The answer is 7."],
        # first sample right, majority right
        "p2": ["The answer is 1,000.", "The answer is 1000.0", "I am not sure.", "The answer is 3."],
    }
    fn = scripted(samples)
    out = cot.self_consistency(fn, ["p1", "p2"], ["6", 1000], k=4)
    assert fn.calls == [(["p1", "p2"], 4)]
    assert (out["maj@1"], out["maj@k"], out["k"]) == (0.5, 1.0, 4)
    assert out["problems"] == [
        {"gold": "6", "answers": ["5", "6", "6", "7"], "vote": "6", "correct": True},
        {"gold": "1000", "answers": ["1000", "1000", None, "3"], "vote": "1000", "correct": True},
    ]
    # The flexible extractor reads the last number instead: p2's third sample still has none.
    flexible = cot.self_consistency(scripted(samples), ["p1", "p2"], ["6", "1000"], k=4, extract=cot.extract_flexible)
    assert [p["answers"] for p in flexible["problems"]] == [["5", "6", "6", "7"], ["1000", "1000", None, "3"]]
    # k = 1 scores the first sample alone.
    one = cot.self_consistency(scripted(samples), ["p1", "p2"], ["6", "1000"], k=1)
    assert one["maj@1"] == one["maj@k"] == 0.5


@pytest.mark.timeout(60)
def test_self_consistency_rejects_bad_input():
    fn = scripted({"p": ["The answer is 1."] * 3})
    with pytest.raises(ValueError, match="k=0"):
        cot.self_consistency(fn, ["p"], ["1"], k=0)
    with pytest.raises(ValueError, match="as many golds as prompts"):
        cot.self_consistency(fn, ["p"], [], k=1)
    with pytest.raises(ValueError, match="4 completions"):
        cot.self_consistency(fn, ["p"], ["1"], k=4)  # the script only has 3


@pytest.mark.timeout(60)
def test_evaluate_cot_standard_vs_cot():
    problems = data.heldout_problems(2, 3)

    def generate_fn(prompts, num_samples):
        """Answers correctly when prompted with chain of thought, wrongly (answer + 1) otherwise."""
        out = []
        for prompt in prompts:
            p = next(p for p in problems if prompt.endswith(p.prompt))
            out.append([p.cot if "=" in prompt else f"The answer is {p.answer + 1}."] * num_samples)
        return out

    shots = data.heldout_problems(1, 2)
    assert cot.evaluate_cot(generate_fn, problems, shots, compact=True) == {"standard": 0.0, "cot": 1.0}
