"""The Mamba paper's synthetic tasks (train/data/synthetic.py) and their per-length evaluation (train/evaluate.py):
generators checked by an independent decoding of their text, the held-out stream, refusals, the
pipeline's loss mask, accuracy against a NumPy computation for a scripted model, chunked equal to
whole-sequence evaluation, and a few trainer steps of a Mamba synthetic config."""
import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from tests import helpers
from train import data, evaluate, trainer

pytestmark = pytest.mark.timeout(120)

BYTE = data.ByteTokenizer()


def config(**overrides):
    c = data.default_config()
    c.update(dict(source="induction_heads", task_length=24, num_memorize=4, task_vocab=5, eval_examples=6))
    c.update(overrides)
    return c


# ----------------------------------------------------------------------------- generators

def decode_copying(prompt, completion, length, num_memorize, vocab):
    """Independent reading of a selective-copying example: returns the data positions."""
    alphabet = data.TASK_SYMBOLS[:vocab]
    assert len(prompt) == length and prompt[-1] == "="
    body = prompt[:-1]
    assert re.fullmatch(f"[.{alphabet}]*", body), body
    positions = [i for i, ch in enumerate(body) if ch != "."]
    assert len(positions) == num_memorize
    assert completion == "".join(body[i] for i in positions)
    return positions


def decode_induction(prompt, completion, length, vocab):
    """Independent reading of an induction-heads example: returns the first trigger's position."""
    alphabet = data.TASK_SYMBOLS[:vocab]
    assert len(prompt) == length and prompt[-1] == "#" and prompt.count("#") == 2
    first = prompt.index("#")
    assert first <= length - 3 and completion == prompt[first + 1] and len(completion) == 1
    assert re.fullmatch(f"[{alphabet}]*", prompt.replace("#", "")), prompt
    return first


def test_generators_are_deterministic_and_depend_on_every_argument():
    for source in data.SYNTHETIC_SOURCES:
        record = data.synthetic_record(source, 3, 7, 40, "train", 4, 6)
        assert record == data.synthetic_record(source, 3, 7, 40, "train", 4, 6)
        others = [data.synthetic_record(source, 4, 7, 40, "train", 4, 6),
                  data.synthetic_record(source, 3, 8, 40, "train", 4, 6),
                  data.synthetic_record(source, 3, 7, 40, "eval", 4, 6)]
        assert all(o != record for o in others)
    c = config(source="selective_copying")
    assert data.synthetic_heldout(c, 30) == data.synthetic_heldout(c, 30) and len(data.synthetic_heldout(c, 30)) == 6


@pytest.mark.parametrize("length", [5, 17, 64])
def test_selective_copying_follows_the_definition(length):
    starts, ends, symbols = set(), set(), set()
    for index in range(300):
        prompt, completion = data.synthetic_record("selective_copying", 0, index, length, "train", 4, 5)
        positions = decode_copying(prompt, completion, length, 4, 5)
        starts.add(positions[0])
        ends.add(positions[-1])
        symbols.update(completion)
    # positions spread over the whole body (a data symbol may sit first or last); every symbol used
    assert 0 in starts and length - 2 in ends and symbols == set(data.TASK_SYMBOLS[:5])


@pytest.mark.parametrize("length", [3, 10, 64])
def test_induction_heads_follows_the_definition(length):
    firsts, keys = set(), set()
    for index in range(300):
        prompt, completion = data.synthetic_record("induction_heads", 1, index, length, "eval", 16, 4)
        firsts.add(decode_induction(prompt, completion, length, 4))
        keys.add(completion)
    assert min(firsts) == 0 and max(firsts) == length - 3 and keys == set(data.TASK_SYMBOLS[:4])


def test_heldout_stream_is_not_the_training_stream():
    for source in data.SYNTHETIC_SOURCES:
        c = config(source=source, eval_examples=200, task_length=32)
        train = {data.synthetic_record(source, c.seed, i, 32, "train", c.num_memorize, c.task_vocab)
                 for i in range(2000)}
        held = data.synthetic_heldout(c, 32)
        assert len(set(held)) == 200 and not train & set(held)
        # the held-out set is fixed by data.seed, whatever the trainer's seed
        assert data.synthetic_heldout(c, 32, seed=c.seed) == held != data.synthetic_heldout(c, 32, seed=c.seed + 1)


# ----------------------------------------------------------------------------- pipeline and refusals

@pytest.mark.parametrize("source", data.SYNTHETIC_SOURCES)
def test_batches_train_on_the_completion_only_and_eval_split_is_the_heldout_set(source):
    c = config(source=source, packing=False)
    width = data.synthetic_completion_length(c)
    seq_len = data.synthetic_example_tokens(c)
    assert seq_len == 1 + 24 + width
    batch = next(iter(data.make_dataset(c, tokenizer=BYTE, seq_len=seq_len, batch_size=4)))
    for row in range(4):
        mask = batch["loss_mask"][row]
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(24, 25 + width))  # completion + eos
        assert batch["targets"][row][-1] == BYTE.eos_id
        text = BYTE.decode(batch["inputs"][row])  # [bos] + prompt + completion
        prompt, completion = text[:24], text[24:]
        if source == "selective_copying":
            decode_copying(prompt, completion, 24, 4, 5)
        else:
            decode_induction(prompt, completion, 24, 5)
    examples = [e for b in data.make_dataset(c, tokenizer=BYTE, seq_len=seq_len, batch_size=4, split="eval")
                for e in data.batch_examples(b)]
    assert [BYTE.decode(e) for e in examples] == [p + q for p, q in data.synthetic_heldout(c, 24)]


@pytest.mark.parametrize("overrides, field", [
    (dict(task_vocab=1), "data.task_vocab"),
    (dict(task_vocab=63), "data.task_vocab"),
    (dict(num_memorize=0), "data.num_memorize"),
    (dict(task_length=2), "data.task_length"),
    (dict(source="selective_copying", num_memorize=24), "data.task_length"),
    (dict(eval_lengths=(64, 2)), "data.eval_lengths"),
    (dict(eval_lengths=("long",)), "data.eval_lengths"),
    (dict(tokenizer="sentencepiece", spm_model="x.model"), "data.tokenizer"),
])
def test_refusals_name_the_field(overrides, field):
    data.validate(config())
    with pytest.raises(ValueError, match=re.escape(field)):
        data.validate(config(**overrides))


def test_short_seq_len_is_refused_by_name():
    with pytest.raises(ValueError, match=r"train\.seq_len >= 26"):
        data.make_dataset(config(), tokenizer=BYTE, seq_len=25, batch_size=2)
    c = ml_collections.ConfigDict(dict(data=config(source="text", paths=["x"]), train=dict(batch_size=1, seq_len=8)))
    with pytest.raises(ValueError, match="length_generalization needs"):
        evaluate.length_generalization(None, None, None, BYTE, c)


# ----------------------------------------------------------------------------- evaluation

V = BYTE.vocab_size
_rng = np.random.default_rng(0)
BIGRAM = _rng.standard_normal((V, V)).astype(np.float32)
POSITION = 2 * _rng.standard_normal((7, V)).astype(np.float32)
# The scripted model is right now and then: 'a' after the trigger, the next symbol after a symbol.
BIGRAM[BYTE.encode("#"), BYTE.encode("a")] = 9.0
BIGRAM[BYTE.encode(data.TASK_SYMBOLS[:5]), BYTE.encode(data.TASK_SYMBOLS[1:5] + "a")] = 9.0


def scripted_apply(params, tokens, cfg, *, cache=None, **kw):
    """Logits = BIGRAM[token] + POSITION[position % 7]; positions continue the cache's index."""
    start = 0 if cache is None else cache["index"]
    positions = start + jnp.arange(tokens.shape[1])
    logits = jnp.asarray(BIGRAM)[tokens] + jnp.asarray(POSITION)[positions % 7]
    return logits, ({} if cache is None else {"cache": {"index": start + tokens.shape[1]}})


SCRIPTED = types.SimpleNamespace(apply=scripted_apply, init_cache=lambda cfg, batch, max_len: {"index": 0})


def run_config(source, lengths):
    """40 examples per length, in passes of 3 x 30 tokens' worth of rows (1 to 3 rows here)."""
    return ml_collections.ConfigDict(dict(data=config(source=source, eval_examples=40, eval_lengths=lengths),
                                          train=dict(batch_size=3, seq_len=30)))


@pytest.mark.parametrize("source", data.SYNTHETIC_SOURCES)
@pytest.mark.parametrize("chunk", [0, 7])
def test_accuracy_of_a_scripted_model_equals_numpy(source, chunk):
    c = run_config(source, (9, 24, 40))
    result = evaluate.length_generalization(SCRIPTED, None, None, BYTE, c, chunk=chunk)
    assert set(result) == {"accuracy/9", "accuracy/24", "accuracy/40", "token_accuracy/9", "token_accuracy/24",
                           "token_accuracy/40", "accuracy/mean"}
    width = 4 if source == "selective_copying" else 1
    for length in (9, 24, 40):
        right = []
        for prompt, completion in data.synthetic_heldout(c.data, length):
            ids = np.array([BYTE.bos_id] + BYTE.encode(prompt + completion))
            read = np.arange(length, length + width)  # inputs at these positions predict the completion
            predicted = np.argmax(BIGRAM[ids[read]] + POSITION[read % 7], axis=-1)
            right.append(predicted == ids[read + 1])
        right = np.array(right)
        assert result[f"accuracy/{length}"] == pytest.approx(np.mean(right.all(axis=1)))
        assert result[f"token_accuracy/{length}"] == pytest.approx(np.mean(right))
    assert 0 < result["token_accuracy/40"] < 1  # the scripted model is neither always right nor always wrong
    assert result["accuracy/mean"] == pytest.approx(np.mean([result[f"accuracy/{n}"] for n in (9, 24, 40)]))


@pytest.mark.parametrize("family", ["transformer", "mamba"])
def test_chunked_evaluation_equals_whole_sequences(family):
    model = models.get(family)
    extra = dict(n_heads=2, n_kv_heads=2, d_ff=32) if family == "transformer" else dict(d_state=4, chunk_size=8)
    mcfg = model.from_config(dict(vocab_size=V, d_model=16, n_layers=2, dtype="float32", **extra))
    params = helpers.jit(model.init, static_argnums=0)(mcfg, jax.random.PRNGKey(1))
    inputs = np.random.default_rng(2).integers(3, V, (5, 45))
    whole = evaluate.completion_predictions(model, mcfg, params, inputs, 40, 5, rows=2)
    chunked = evaluate.completion_predictions(model, mcfg, params, inputs, 40, 5, rows=2, chunk=16)
    logits = helpers.jit(model.apply, static_argnums=2)(params, jnp.asarray(inputs), mcfg)[0]
    np.testing.assert_array_equal(whole, np.argmax(np.asarray(logits)[:, 40:45], axis=-1))
    np.testing.assert_array_equal(chunked, whole)
    if family == "transformer":  # a context ring of 2 pads the 45 tokens to 48 (a multiple of 2 x 2)
        from parallel import mesh as pmesh, sharding

        ring = dataclasses.replace(mcfg, attention="ring")
        with sharding.activate(pmesh.make_mesh({"context": 2}, jax.devices()[:2]), sharding.DEFAULT_RULES):
            on_ring = evaluate.completion_predictions(model, ring, params, inputs, 40, 5, rows=2)
        np.testing.assert_array_equal(on_ring, whole)


@pytest.mark.timeout(240)
def test_mamba_synthetic_config_trains_and_evaluates_per_length(tmp_path):
    from experiments import mamba_induction

    c = mamba_induction.get_config()
    # Small sizes and the cheapest programs to compile (the eval split is read by the pipeline test).
    c.model.update(d_model=16, d_state=4, chunk_size=8, dtype="float32", remat="none", scan="reference")
    c.data.update(task_length=16, eval_examples=4, eval_lengths=(8, 48))
    c.train.update(steps=3, batch_size=8, seq_len=data.synthetic_example_tokens(c.data), eval_every=0,
                   ckpt_every=3, log_every=1, progress=False)
    c.optim.warmup_steps = 1
    result = trainer.run(c, str(tmp_path))
    assert result["step"] == 3 and np.isfinite(result["loss"]) and result["loss"] > 0
    lengths = evaluate.evaluate_workdir(c, str(tmp_path), "length_generalization")
    assert lengths["step"] == 3
    for n in (8, 48):
        accuracy, tokens_right = lengths[f"accuracy/{n}"], lengths[f"token_accuracy/{n}"]
        assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0) and accuracy <= tokens_right <= 1  # exact match: all tokens
