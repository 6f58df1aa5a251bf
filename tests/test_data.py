"""Tests for the train/data package and models/tokenizers.py: tokenizers, the arithmetic corpus and its
preference pairs, file sources and the Grain pipeline."""

import dataclasses
import json
import re

import numpy as np
import pytest

from train import data
from train.data import pipeline

BYTE = data.ByteTokenizer()


def config(**overrides):
    cfg = data.default_config()
    cfg.update(overrides)
    return cfg


def take(ds, n):
    iterator = iter(ds)
    return [next(iterator) for _ in range(n)]


def all_batches(ds):
    return list(iter(ds))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recompute(prompt):
    """Independent evaluation of a prompt: start value and [(op, n, value after)] left to right."""
    match = re.fullmatch(r"Q:(\d+)((?:[-+*/%]\d+)+)\nA:", prompt)
    assert match, prompt
    value = int(match.group(1))
    start, steps = value, []
    for op, n in re.findall(r"([-+*/%])(\d+)", match.group(2)):
        n = int(n)
        value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n, "%": value % n}[op]
        steps.append((op, n, value))
    return start, steps


# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.timeout(60)
def test_byte_tokenizer():
    assert (BYTE.pad_id, BYTE.bos_id, BYTE.eos_id, BYTE.vocab_size) == (0, 1, 2, 259)
    text = "Q:7+3\nA: é ✓"
    ids = BYTE.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert all(3 <= i < 259 for i in ids)
    assert BYTE.decode(ids) == text
    assert BYTE.decode([1] + ids + [2] + BYTE.encode("after eos")) == text
    assert BYTE.decode([0, 1] + BYTE.encode("ab") + [0, 0]) == "ab"
    assert BYTE.decode([0xFF + 3, ord("a") + 3]) == "\ufffda"


@pytest.mark.timeout(60)
def test_sentencepiece_tokenizer(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {7 * i}" for i in range(300)))
    prefix = tmp_path / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=60, model_type="bpe", pad_id=3, minloglevel=2
    )
    cfg = config(
        tokenizer="sentencepiece",
        spm_model=str(prefix) + ".model",
        source="jsonl",
        paths=[write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the fox", "completion": " jumps 12"}])],
    )
    tok = data.make_tokenizer(cfg)
    assert isinstance(tok, data.SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (3, 1, 2, 60)
    ids = tok.encode("the lazy dog 42")
    assert all(0 <= i < 60 for i in ids)
    assert tok.decode(ids) == "the lazy dog 42"
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + tok.encode("fox")) == "the lazy dog 42"
    batch = take(data.make_dataset(cfg, tokenizer=tok, seq_len=16, batch_size=2), 1)[0]
    assert batch["inputs"][0, 0] == tok.bos_id
    assert np.all(batch["inputs"][batch["segment_ids"] == 0] == tok.pad_id)
    assert tok.decode(batch["targets"][0][batch["loss_mask"][0] == 1]) == "jumps 12"  # spm drops leading space


@pytest.mark.timeout(60)
def test_make_tokenizer_errors(tmp_path):
    assert isinstance(data.make_tokenizer(config()), data.ByteTokenizer)
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        data.make_tokenizer(config(tokenizer="sentencepiece", spm_model=missing))
    with pytest.raises(ValueError, match="spm_model"):
        data.make_tokenizer(config(tokenizer="sentencepiece"))
    with pytest.raises(ValueError, match="data.tokenizer"):
        data.make_tokenizer(config(tokenizer="words"))


# ---------------------------------------------------------------------------------------------
# Arithmetic corpus


@pytest.mark.timeout(60)
def test_arithmetic_is_deterministic():
    for steps in range(1, 9):
        assert data.arithmetic_problem(3, 17, steps) == data.arithmetic_problem(3, 17, steps)
    seed0 = [data.arithmetic_problem(0, i, 4).prompt for i in range(50)]
    seed1 = [data.arithmetic_problem(1, i, 4).prompt for i in range(50)]
    assert sum(a != b for a, b in zip(seed0, seed1)) > 45
    assert len(set(seed0)) > 45


@pytest.mark.timeout(60)
def test_arithmetic_matches_independent_recomputation():
    seen_ops = set()
    for steps in range(1, 9):
        for index in range(300):
            p = data.arithmetic_problem(0, index, steps)
            start, work = recompute(p.prompt)
            assert p.num_steps == len(work) == steps
            assert 0 <= start <= 99
            values = [v for _, _, v in work]
            assert all(0 <= v <= data.MAX_VALUE for v in values), p.prompt
            for op, n, _ in work:
                seen_ops.add(op)
                allowed = {"+": 1 <= n <= 99, "-": 1 <= n <= 99, "*": 2 <= n <= 5, "/": n == 2, "%": 3 <= n <= 9}
                assert allowed[op], p.prompt
            assert p.answer == values[-1]
            assert p.cot == "".join(f"{op}{n}={v}" for op, n, v in work) + f".The answer is {p.answer}."
            assert p.direct == f"The answer is {p.answer}."
            assert p.completion("cot") == p.cot and p.completion("direct") == p.direct
    assert seen_ops == set("+-*/%")


@pytest.mark.timeout(60)
def test_arithmetic_is_not_additive():
    plain_sums = 0
    for index in range(400):
        p = data.arithmetic_problem(0, index, 4)
        start, work = recompute(p.prompt)
        plain_sums += p.answer == start + sum(n for _, n, _ in work)
    assert plain_sums < 0.1 * 400


@pytest.mark.timeout(60)
def test_extract_answer():
    from train import cot

    p = data.arithmetic_problem(0, 1, 5)
    assert data.extract_answer(p.cot) == p.answer
    assert data.extract_answer(p.direct) == p.answer
    assert data.extract_answer("+3=10.The answer is 10.The answer is 4.") == 10
    assert data.extract_answer("The answer is .") is None
    assert data.extract_answer("no answer here") is None
    assert data.extract_answer("The answer is -3.") == -3
    assert data.extract_answer("The answer is 12.5.") is None  # not an integer
    # One extraction: the integer of train.cot's strict extraction.
    for text in ("*2=10.The answer is 10.", "The answer is 007.", "The answer is 4-3.", "x", "The answer is 9"):
        strict = cot.extract_strict(text)
        assert data.extract_answer(text) == (None if strict is None else int(strict))


@pytest.mark.timeout(60)
def test_heldout_is_disjoint_from_training_at_every_step_count():
    for steps in range(1, 9):
        heldout = data.heldout_problems(steps, 40, seed=0)
        prompts = {p.prompt for p in heldout}
        assert len(prompts) == 40 and all(p.num_steps == steps and data.is_heldout(p.prompt) for p in heldout)
        assert data.heldout_problems(steps, 40, seed=0) == heldout
        train = [data.training_problem(0, i, steps, steps) for i in range(600)]
        kept = [p for p in train if p is not None]
        assert 0.8 < len(kept) / len(train) < 0.97  # ~10% of questions are held out
        assert not {p.prompt for p in kept} & prompts
        assert not any(data.is_heldout(p.prompt) for p in kept)


@pytest.mark.timeout(60)
def test_training_stream_skips_heldout_and_mixes_step_counts():
    cfg = config(min_steps=2, max_steps=5, variant="direct")
    examples = data.example_dataset(cfg, tokenizer=BYTE, seq_len=128, seed=0)
    steps = set()
    for i in range(300):
        ex = examples[i]
        if ex is None:
            continue
        text = BYTE.decode(np.append(ex["inputs"], ex["targets"][-1]))
        prompt = text[: text.index("\nA:") + 3]
        assert not data.is_heldout(prompt)
        start, work = recompute(prompt)
        steps.add(len(work))
        assert text == prompt + f"The answer is {work[-1][2]}."
    assert steps == {2, 3, 4, 5}


@pytest.mark.timeout(60)
def test_arithmetic_eval_split_is_heldout_and_finite():
    cfg = config(eval_examples=40, min_steps=1, max_steps=4)
    batches = all_batches(data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=8, split="eval"))
    assert all(b["inputs"].shape == (8, 96) for b in batches)
    texts = [BYTE.decode(e) for b in batches for e in data.batch_examples(b)]
    assert len(texts) == len(set(texts)) == 40
    assert all(data.is_heldout(t[: t.index("\nA:") + 3]) for t in texts)


# ---------------------------------------------------------------------------------------------
# Files and the standard library


@pytest.mark.timeout(60)
def test_jsonl_records_and_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "plain"}, {"prompt": "p", "completion": "c", "id": 3}])
    assert data.read_jsonl_records([good]) == [("", "plain"), ("p", "c")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}, line 3")):
        data.read_jsonl_records([good, str(bad)])
    for line in ("[1, 2]", '{"prompt": "only a prompt"}', '{"text": 5}'):
        bad.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{bad}, line 2")):
            data.read_jsonl_records([str(bad)])
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        data.read_jsonl_records([str(tmp_path / "nowhere.jsonl")])
    cfg = config(source="jsonl", paths=[str(bad)])
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        data.make_dataset(cfg, tokenizer=BYTE, seq_len=32, batch_size=2)


@pytest.mark.timeout(60)
def test_text_files_split_on_blank_lines_and_chunk(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n  \nsecond\n\n\n" + "long line " * 20 + "\n")
    docs = data.read_text_documents([str(path)])
    assert docs == ["first para\nline two", "second", ("long line " * 20).rstrip("\n")]
    chunks = data.chunk_text("ab\ncd\n" + "x" * 7 + "\n", 4)
    assert chunks == ["ab\n", "cd\n", "xxxx", "xxx\n"]
    assert "".join(data.chunk_text(docs[2], 15)) == docs[2]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="latin1.txt"):
        data.read_text_documents([str(tmp_path / "latin1.txt")])
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        data.read_text_documents([str(tmp_path / "gone.txt")])

    cfg = config(source="text", paths=[str(path)], packing=False)
    batches = take(data.make_dataset(cfg, tokenizer=BYTE, seq_len=32, batch_size=4), 3)
    for b in batches:
        np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] > 0)  # plain text: every token trained
    texts = {BYTE.decode(e) for b in batches for e in data.batch_examples(b)}
    assert "second" in texts and all(len(t) <= 31 for t in texts)


@pytest.mark.timeout(60)
def test_stdlib_corpus():
    train, evaluation = data.stdlib_files("train"), data.stdlib_files("eval")
    assert len(train) > 10 * len(evaluation) > 0
    assert not set(train) & set(evaluation)
    assert train == sorted(train) and data.stdlib_files("train") == train
    assert not any("site-packages" in f.parts for f in train + evaluation)
    assert data.stdlib_files("eval", max_files=2) == evaluation[:2]
    docs = data.stdlib_documents("train", max_files=3)
    assert len(docs) == 3 and all(docs)
    cfg = config(source="stdlib", max_files=2)
    for split in ("train", "eval"):
        batch = take(data.make_dataset(cfg, tokenizer=BYTE, seq_len=64, batch_size=4, split=split), 1)[0]
        assert batch["segment_ids"][0, 0] == 1
        np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(source="web"), "data.source"),
        (dict(variant="long"), "data.variant"),
        (dict(tokenizer="words"), "data.tokenizer"),
        (dict(min_steps=5, max_steps=3), "data.min_steps"),
        (dict(max_steps=9), "data.max_steps"),
        (dict(min_steps=0), "data.min_steps"),
        (dict(source="text"), "data.paths"),
        (dict(source="jsonl"), "data.paths"),
        (dict(tokenizer="sentencepiece"), "data.spm_model"),
        (dict(context_problems=0), "data.context_problems"),
        (dict(cot_fraction=1.5), "data.cot_fraction"),
    ],
)
def test_validate(overrides, field):
    data.validate(config())
    with pytest.raises(ValueError, match=re.escape(field)):
        data.validate(config(**overrides))


# ---------------------------------------------------------------------------------------------
# Pipeline


def check_batch_invariants(batch, rows, seq_len, prefix="", empty_rows=False):
    keys = [prefix + k for k in data.BATCH_KEYS]
    assert set(keys) <= set(batch)
    for k in keys:
        assert batch[k].shape == (rows, seq_len) and batch[k].dtype == np.int32
    for inputs, targets, segments, positions, mask in zip(*(batch[k] for k in keys)):
        pad = segments == 0
        assert np.all(mask[pad] == 0) and np.all(positions[pad] == 0) and np.all(inputs[pad] == 0)
        if pad.all():  # an eval stream's last batch is filled up with empty rows
            assert empty_rows
            continue
        ids = segments[~pad]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # contiguous 1, 2, 3, ...
        assert np.all(pad[len(ids) :])  # padding only at the end
        for s in np.unique(ids):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            np.testing.assert_array_equal(targets[where[:-1]], inputs[where[1:]])  # next token, same example
            example = np.append(inputs[where], targets[where[-1]])  # [bos] + prompt + completion + [eos]
            assert example[0] == BYTE.bos_id and example[-1] == BYTE.eos_id
            text = BYTE.decode(example)
            prompt_len = len(BYTE.encode(text[: text.index("\nA:") + 3]))
            np.testing.assert_array_equal(mask[where], np.arange(len(where)) >= prompt_len)  # completion + eos only


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing", [True, False])
def test_batch_invariants(packing):
    batches = take(data.make_dataset(config(packing=packing), tokenizer=BYTE, seq_len=128, batch_size=16), 3)
    for b in batches:
        assert set(b) == set(data.BATCH_KEYS) == set(data.batch_keys(config()))
        check_batch_invariants(b, 16, 128)
        per_row = b["segment_ids"].max(axis=1)
        assert per_row.mean() > 1.5 if packing else np.all(per_row == 1)


@pytest.mark.timeout(60)
def test_loss_on_prompt_and_truncation(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Q:1+1\nA:", "completion": "2"}, {"prompt": "Q:", "completion": "x" * 50}]
    )
    cfg = config(source="jsonl", paths=[path], loss_on_prompt=True, packing=False)
    with pytest.raises(ValueError, match=r"1 of the 2 train examples .* longer than train.seq_len=20 tokens \(the "
                                         r"longest needs 53\); raise train.seq_len to 53 or set data.truncate=True"):
        data.make_dataset(cfg, tokenizer=BYTE, seq_len=20, batch_size=2)
    cfg.truncate = True  # cut to fit, as asked
    batch = take(data.make_dataset(cfg, tokenizer=BYTE, seq_len=20, batch_size=2), 1)[0]
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
    examples = sorted(data.batch_examples(batch), key=len)
    assert BYTE.decode(examples[0]) == "Q:1+1\nA:2"
    assert examples[1] == tuple([BYTE.bos_id] + BYTE.encode("Q:" + "x" * 18))  # cut to seq_len + 1 tokens
    cfg.loss_on_prompt = False
    batch = take(data.make_dataset(cfg, tokenizer=BYTE, seq_len=20, batch_size=2), 1)[0]
    assert batch["loss_mask"].sum() == 2 + 18  # '2' + eos, and the 18 x's that fit


@pytest.mark.timeout(60)
def test_determinism_and_seeds():
    make = lambda seed: data.make_dataset(config(), tokenizer=BYTE, seq_len=96, batch_size=8, seed=seed)
    first, again, other = take(make(5), 3), take(make(5), 3), take(make(6), 3)
    for a, b in zip(first, again):
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))
    from_cfg = take(data.make_dataset(config(seed=5), tokenizer=BYTE, seq_len=96, batch_size=8), 1)[0]
    np.testing.assert_array_equal(from_cfg["inputs"], first[0]["inputs"])


@pytest.mark.timeout(60)
def test_process_shards_partition_the_stream(tmp_path):
    rows = [{"prompt": f"q{i}:", "completion": f"answer {i}"} for i in range(41)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = config(source="jsonl", paths=[path], eval_paths=[path])

    def examples(split, index, count):
        ds = data.make_dataset(
            cfg, tokenizer=BYTE, seq_len=32, batch_size=4, split=split, process_index=index, process_count=count
        )
        if split == "eval":
            return [e for b in all_batches(ds) for e in data.batch_examples(b)]
        return [e for b in take(ds, 2) for e in data.batch_examples(b)]

    single = examples("eval", 0, 1)
    shards = [examples("eval", p, 2) for p in range(2)]
    assert len(single) == 41 and sorted(single) == sorted(shards[0] + shards[1])
    assert not set(shards[0]) & set(shards[1])

    # Training: each process takes a disjoint slice of the same shuffled order.
    ex = lambda index, count: data.example_dataset(
        cfg, tokenizer=BYTE, seq_len=32, seed=1, process_index=index, process_count=count
    )
    one, two = ex(0, 1), [ex(p, 2) for p in range(2)]
    for i in range(41):  # the first epoch
        np.testing.assert_array_equal(two[i % 2][i // 2]["inputs"], one[i]["inputs"])
    epoch = [tuple(one[i]["inputs"]) for i in range(41)]
    assert len(set(epoch)) == 41
    next_epoch = [tuple(one[i]["inputs"]) for i in range(41, 82)]
    assert set(next_epoch) == set(epoch) and next_epoch != epoch  # reshuffled each epoch
    # Whole batches from the two training shards never share an example.
    assert not set(examples("train", 0, 2)) & set(examples("train", 1, 2))

    arith = lambda index, count: data.example_dataset(
        config(), tokenizer=BYTE, seq_len=96, seed=2, process_index=index, process_count=count
    )
    one, two = arith(0, 1), [arith(p, 2) for p in range(2)]
    for i in range(40):
        a, b = one[i], two[i % 2][i // 2]
        assert (a is None and b is None) or np.array_equal(a["inputs"], b["inputs"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing, prefetch", [(True, 2), (False, 0)])
def test_iterator_state_round_trip(packing, prefetch):
    cfg = config(packing=packing, prefetch=prefetch)
    ds = data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=8, seed=3)
    iterator = iter(ds)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # checkpointable as JSON
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=8, seed=3))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.timeout(60)
def test_pipeline_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(config(), tokenizer=BYTE, seq_len=32, batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="split"):
        data.make_dataset(config(), tokenizer=BYTE, seq_len=32, batch_size=4, split="test")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="data.eval_paths"):
        data.make_dataset(config(source="jsonl", paths=[path]), tokenizer=BYTE, seq_len=32, batch_size=4, split="eval")


def test_mixture_contexts_are_one_style_of_training_problems_in_the_few_shot_format():
    from train import cot

    styles = []
    for index in range(200):
        text = data.mixture_context(0, index, 1, 6, context_problems=3, cot_fraction=0.5)
        parts = text.split("\n\n")
        assert 1 <= len(parts) <= 3
        problems = [p for j in range(data.CONTEXT_STRIDE)
                    if (p := data.training_problem(0, index * data.CONTEXT_STRIDE + j, 1, 6)) is not None][:len(parts)]
        chain = [p.prompt + p.cot for p in problems]
        direct = [p.prompt + p.direct for p in problems]
        assert parts in (chain, direct)  # one style per context, problems never held out
        assert not any(data.is_heldout(p.prompt) for p in problems)
        styles.append(parts == chain)
        # the context is build_prompt's exemplar text
        assert cot.build_prompt(problems, "x", chain_of_thought=parts == chain, compact=True) == text + "\n\nQ:x\nA:"
    assert 0.35 < np.mean(styles) < 0.65
    assert all(data.mixture_context(0, i, cot_fraction=0.0).count("=") == 0 for i in range(20))


def test_mixture_dataset_trains_every_token_and_evaluates_both_styles():
    cfg = config(variant="mixture", context_problems=2, max_steps=4, eval_examples=8)
    tok = data.ByteTokenizer()
    batch = next(iter(data.make_dataset(cfg, tokenizer=tok, seq_len=160, batch_size=4, seed=0)))
    assert (batch["loss_mask"] == (batch["segment_ids"] > 0)).all()
    records = list(pipeline._records(cfg, "eval", 0, 160))
    assert any("=" in c for _, c in records) and any("=" not in c for _, c in records)


def test_exemplars_are_short_training_problems_and_heldout_can_be_capped():
    ex = data.exemplar_problems(3, 0, 1, 6)
    assert [p.num_steps for p in ex] == [2, 3, 4] and not any(data.is_heldout(p.prompt) for p in ex)
    assert len(data.heldout_problems(1, 500, at_most=True)) == 273
    with pytest.raises(ValueError, match="found only 273"):
        data.heldout_problems(1, 500)


# ---------------------------------------------------------------------------------------------
# Preference pairs ('arithmetic_pairs')


def pair_config(**overrides):
    return config(**{"source": "arithmetic_pairs", "max_steps": 4, "eval_examples": 12, **overrides})


@pytest.mark.timeout(60)
def test_preference_pairs_reject_a_close_wrong_answer_in_the_last_step():
    offsets = set()
    for index in range(300):
        pair = data.training_pair(0, index, 1, 8)
        problem = data.training_problem(0, index, 1, 8)
        if problem is None:
            assert pair is None
            continue
        prompt, chosen, rejected = pair
        assert pair == data.training_pair(0, index, 1, 8)  # deterministic
        start, work = recompute(prompt)
        assert prompt == problem.prompt and chosen == problem.cot
        # The rejected completion: the same steps, the last one with result W != answer, and answer W.
        match = re.fullmatch(r"(.*=)(\d+)\.The answer is (\d+)\.", rejected)
        assert match and match.group(2) == match.group(3)
        wrong = int(match.group(2))
        assert match.group(1) == chosen[: len(match.group(1))] and chosen[len(match.group(1)):].startswith(
            f"{problem.answer}.")
        assert wrong == data.wrong_answer(problem, 0) != problem.answer and 0 <= wrong <= data.MAX_VALUE
        offsets.add(wrong - problem.answer)
        assert data.preference_pair(problem, 0, "direct") == (prompt, problem.direct, f"The answer is {wrong}.")
    assert offsets == set(data.WRONG_OFFSETS)
    other_seed = [data.wrong_answer(data.arithmetic_problem(0, i, 3), 1) for i in range(50)]
    assert other_seed != [data.wrong_answer(data.arithmetic_problem(0, i, 3), 0) for i in range(50)]


def check_pair_batch(batch, rows, seq_len, seed, empty_rows=False):
    """Both sides are valid LM batches, and segment s of row r is one pair on both sides."""
    assert set(batch) == set(data.PAIR_KEYS)
    for side in ("chosen_", "rejected_"):
        check_batch_invariants(batch, rows, seq_len, side, empty_rows)
    for r in range(rows):
        chosen = data.batch_examples({k: v[r:r + 1] for k, v in batch.items()}, "chosen_")
        rejected = data.batch_examples({k: v[r:r + 1] for k, v in batch.items()}, "rejected_")
        assert len(chosen) == len(rejected)
        np.testing.assert_array_equal(np.unique(batch["chosen_segment_ids"][r]),
                                      np.unique(batch["rejected_segment_ids"][r]))
        for c, j in zip(chosen, rejected):
            c_text, j_text = BYTE.decode(c), BYTE.decode(j)
            prompt = c_text[: c_text.index("\nA:") + 3]
            start, work = recompute(prompt)
            problem = data.Problem(prompt, "", f"The answer is {work[-1][2]}.", work[-1][2], len(work))
            problem = dataclasses.replace(problem, cot="".join(f"{o}{n}={v}" for o, n, v in work) + "." + problem.direct)
            assert (c_text, j_text) == tuple(prompt + x for x in data.preference_pair(problem, seed)[1:])
    return [BYTE.decode(e) for e in data.batch_examples(batch, "chosen_")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing", [True, False])
def test_pair_batches_align_chosen_and_rejected_row_for_row(packing):
    cfg = pair_config(packing=packing)
    assert data.batch_keys(cfg) == data.PAIR_KEYS
    texts = []
    for batch in take(data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=8, seed=4), 3):
        texts += check_pair_batch(batch, 8, 96, seed=4)
        per_row = batch["chosen_segment_ids"].max(axis=1)
        assert per_row.mean() > 1.5 if packing else np.all(per_row == 1)
    assert not any(data.is_heldout(t[: t.index("\nA:") + 3]) for t in texts)  # held out as for 'arithmetic'
    evaluation = all_batches(data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=8, split="eval", seed=4))
    texts = [t for b in evaluation for t in check_pair_batch(b, 8, 96, seed=4, empty_rows=True)]
    assert len(set(texts)) == 12 and all(data.is_heldout(t[: t.index("\nA:") + 3]) for t in texts)


@pytest.mark.timeout(60)
def test_pair_iterator_resumes_exactly_and_refusals():
    cfg = pair_config(prefetch=2)
    make = lambda: data.make_dataset(cfg, tokenizer=BYTE, seq_len=96, batch_size=4, seed=1)
    iterator = iter(make())
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(make())
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(3)]):
        assert a.keys() == b.keys() == set(data.PAIR_KEYS)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="data.variant='mixture' has no preference pairs"):
        data.validate(pair_config(variant="mixture"))
    with pytest.raises(ValueError, match=r"examples of data.source='arithmetic_pairs' are longer than train.seq_len=24 "
                                         r"tokens .*or lower data.max_steps"):  # a pair is never cut
        next(iter(data.make_dataset(pair_config(min_steps=4, prefetch=0, truncate=True), tokenizer=BYTE, seq_len=24,
                                    batch_size=2)))
