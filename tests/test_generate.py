"""Decoding: greedy equality with a naive full-forward loop, stop tokens, compilation count,
input refusal, bfloat16 agreement on a model with large argmax margins; sampling: its limits
(temperature 0, top-k 1, tiny top-p) equal greedy, keys, the filtered distribution against
float64 NumPy (ties and top_p = 1 included), text completion with stop strings, and sharded
decoding equal to one device."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from scipy import stats

import models
from models import generate as G
from models.tokenizers import ByteTokenizer
from parallel import mesh as pmesh
from parallel import sharding
from tests import helpers
from train.config import DEFAULT_RULES

pytestmark = pytest.mark.timeout(120)

T = models.get("transformer")
TINY = helpers.TINY["transformer"]
CFG = helpers.tiny()
PROMPTS = ((5, 17), (8, 1, 33, 60), (12, 7, 7, 30, 44, 9, 51))  # lengths 2, 4, 7: P = 8
NEW = 5


@functools.cache
def params_for(cfg, seed=0):
    """Init params with random (non-unit) norm scales so every weight matters."""
    return helpers.random_params(cfg, seed)


@functools.partial(helpers.jit, static_argnames="cfg")
def full_forward(params, tokens, cfg):
    return T.apply(params, tokens, cfg)[0]


@functools.cache
def naive(prompt, n, cfg=CFG):
    """Greedy by recomputing the whole forward pass (no cache) on the growing, unpadded sequence.

    The sequence is right-padded to one length (16 here) so that every step of every prompt reuses
    one compilation; causal attention keeps the padding out of the logits read at its last token."""
    params, seq = params_for(cfg), list(prompt)
    width = max(16, len(prompt) + n)
    for _ in range(n):
        logits = full_forward(params, jnp.array([seq + [0] * (width - len(seq))], jnp.int32), cfg)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


class CountingModel:
    """The Transformer protocol with a counter of how often ``apply`` is traced."""

    def __init__(self):
        self.traces = 0

    def __getattr__(self, name):
        return getattr(T, name)

    def apply(self, *args, **kwargs):
        self.traces += 1
        return T.apply(*args, **kwargs)


COUNTING = CountingModel()  # one static model for the tests that count traces: they share its compilations


def test_bucket_and_left_pad_layout():
    assert [G.bucket(n) for n in (1, 8, 9, 100, 256, 257, 600)] == [8, 8, 16, 128, 256, 512, 768]
    tokens, positions, segment_ids = G.left_pad([[4, 5, 6], [7]], 4, pad_id=9)
    np.testing.assert_array_equal(tokens, [[9, 4, 5, 6], [9, 9, 9, 7]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segment_ids, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_greedy_equals_naive_full_forward_for_prompts_of_different_lengths():
    params = params_for(CFG)
    expected = [naive(p, NEW) for p in PROMPTS]
    assert len({tuple(e) for e in expected}) == 3  # the rows really differ
    got = G.greedy(T, params, CFG, [list(p) for p in PROMPTS], max_new_tokens=NEW)
    assert got == expected


def test_stop_token_ends_each_row_where_it_is_emitted():
    params = params_for(CFG)
    expected = [naive(p, NEW) for p in PROMPTS]
    # The first token of row 0 that is not already among its earlier tokens, at index k >= 1.
    k = next(i for i in range(1, NEW) if expected[0][i] not in expected[0][:i])
    stop = expected[0][k]
    cut = [e[:e.index(stop)] if stop in e else e for e in expected]
    assert cut[0] == expected[0][:k] and len(cut[0]) < NEW
    # Also with a non-zero pad id and a tight cache: P is capped at 7, the longest prompt.
    kw = {"max_new_tokens": NEW, "stop_token": stop, "pad_id": 13, "max_len": 7 + NEW}
    assert G.greedy(T, params, CFG, PROMPTS, **kw) == cut
    with_stop = G.greedy(T, params, CFG, PROMPTS, **kw, include_stop=True)
    assert with_stop == [e[:e.index(stop) + 1] if stop in e else e for e in expected]


def test_loop_exits_early_pads_stopped_rows_and_returns_the_advanced_cache():
    params = params_for(CFG)
    expected = naive(PROMPTS[0], NEW)
    k = next(i for i in range(1, NEW) if expected[i] not in expected[:i])
    stop, pad, P, max_len = expected[k], 3, 8, 8 + 16
    # Two rows of the same prompt (the batch shape of the second call below: one compilation).
    tokens, positions, segment_ids = G.left_pad([PROMPTS[0]] * 2, P, pad)
    generated, steps, cache = G.decode_padded(
        T, params, CFG, tokens, positions, segment_ids, T.init_cache(CFG, 2, max_len), NEW, stop, pad,
        width=max_len - P)
    chex.assert_shape(generated, (2, max_len - P))
    assert int(steps) == k + 1 < NEW  # every row has stopped: the loop ends before NEW steps
    assert np.asarray(generated).tolist() == [expected[:k + 1] + [pad] * (max_len - P - k - 1)] * 2
    assert int(cache["index"]) == P + k  # prefill P, then k one-token steps
    np.testing.assert_array_equal(cache["segment_ids"][:, :P], segment_ids)
    np.testing.assert_array_equal(cache["segment_ids"][:, P:P + k], 1)
    np.testing.assert_array_equal(cache["segment_ids"][:, P + k:], 0)
    # Two rows, the stop token being row 1's first token: row 1 emits pad after it, row 0 goes on.
    stop1 = naive(PROMPTS[1], NEW)[0]
    tokens, positions, segment_ids = G.left_pad([PROMPTS[0], PROMPTS[1]], P, pad)
    generated, steps, _ = G.decode_padded(
        T, params, CFG, tokens, positions, segment_ids, T.init_cache(CFG, 2, max_len), NEW, stop1, pad,
        width=max_len - P)
    row0, row1 = np.asarray(generated)[:, :NEW].tolist()
    assert row1 == [stop1] + [pad] * (NEW - 1)
    assert stop1 not in expected and row0 == expected and int(steps) == NEW


def test_same_shapes_compile_once():
    params, model = params_for(CFG), COUNTING
    first = G.greedy(model, params, CFG, PROMPTS, max_new_tokens=NEW)
    traces = model.traces
    assert traces >= 2  # the prefill and the decode step
    # Other contents, other lengths in the same bucket (P = 8), another new-token count and
    # stop token within the same cache size (max_len = 8 + 8): no new trace.
    other = [[1, 2, 3], [3] * 7, list(range(10, 18))]
    second = G.greedy(model, params, CFG, other, max_new_tokens=NEW + 1, stop_token=4, pad_id=2)
    assert model.traces == traces
    assert second != first and len(second) == 3
    # Negative control: a prompt longer than the bucket does compile again.
    G.greedy(model, params, CFG, [[1] * 9, [2], [3]], max_new_tokens=NEW)
    assert model.traces > traces


@pytest.mark.parametrize("prompts,kwargs,words", [
    ([[1, 61]], {}, "token id 61, outside the vocabulary"),
    ([[1, 2], [-1]], {}, "prompt 1 holds token id -1"),
    ([[1, 2], []], {}, "prompt 1 must be a non-empty list"),
    ([], {}, "non-empty list of token-id lists"),
    ([[1.0, 2.0]], {}, "integer token ids"),
    ([[1] * 11], {"max_len": 15}, r"exceeds max_len \(15\)"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens is 0"),
    ([[1]], {"stop_token": 61}, "stop_token is 61"),
    ([[1]], {"pad_id": -1}, "pad_id is -1"),
])
def test_refuses_invalid_requests(prompts, kwargs, words):
    with pytest.raises(ValueError, match=words):
        G.greedy(T, params_for(CFG), CFG, prompts, **{"max_new_tokens": NEW, **kwargs})


def test_bfloat16_gives_float32_tokens_when_margins_are_large():
    """A model whose logits are dominated by a fixed permutation of the input token.

    Orthogonal embeddings, a head mapping token t's embedding to token perm[t], and halved
    residual-branch outputs make the top logit lead the next by several units, far above
    bfloat16 rounding; the test checks that premise before comparing tokens.
    """
    v, d = 16, 32
    base = {**TINY, "vocab_size": v, "d_model": d}
    f32, bf16 = T.Config(**{**base, "dtype": "float32"}), T.Config(**{**base, "dtype": "bfloat16"})
    params = dict(params_for(f32, seed=1))
    rng = np.random.default_rng(1)
    table = np.linalg.qr(rng.normal(size=(d, d)))[0][:v] * np.sqrt(d)
    perm = rng.permutation(v)
    params["embed"] = jnp.asarray(table, jnp.float32)
    params["head"] = jnp.asarray(table[np.argsort(perm)].T * 3 / np.sqrt(d), jnp.float32)
    params["layers"] = {**params["layers"], "wo": params["layers"]["wo"] * 0.5,
                        "w_down": params["layers"]["w_down"] * 0.5}
    prompts = [[3, 9, 1], [0, 15, 4, 4, 7], [2, 11, 6, 13, 8, 5, 10, 12, 14]]
    want = G.greedy(T, params, f32, prompts, max_new_tokens=NEW)
    # Premise: margins >> bfloat16 logit error, measured by teacher forcing the float32 tokens
    # (right-padded into one batch; causality keeps the padding out of the logits read).
    seqs = [p + w for p, w in zip(prompts, want)]
    batch = jnp.array([s + [0] * (len(seqs[-1]) - len(s)) for s in seqs], jnp.int32)
    rows = np.repeat(np.arange(3), NEW)
    cols = np.concatenate([np.arange(len(p) - 1, len(p) - 1 + NEW) for p in prompts])
    l32 = full_forward(params, batch, f32)[rows, cols]
    l16 = full_forward(params, batch, bf16)[rows, cols]
    top2 = jnp.sort(l32, axis=-1)[:, -2:]
    np.testing.assert_array_equal(jnp.argmax(l32, axis=-1), np.concatenate(want))
    assert float(jnp.min(top2[:, 1] - top2[:, 0])) > 20 * float(jnp.max(jnp.abs(l32 - l16))) > 0
    got = G.greedy(T, params, bf16, prompts, max_new_tokens=NEW)
    assert got == want


# ----------------------------------------------------------------------------- sampling

def test_sampling_limits_equal_greedy_in_the_same_compiled_loop():
    params, model = params_for(CFG), COUNTING
    want = G.greedy(model, params, CFG, PROMPTS, max_new_tokens=NEW)
    traces = model.traces
    key = jax.random.PRNGKey(3)
    assert G.sample(model, params, CFG, PROMPTS, max_new_tokens=NEW, rng=key, temperature=0.0) == want
    assert G.sample(model, params, CFG, PROMPTS, max_new_tokens=NEW, rng=key, temperature=2.0, top_k=1) == want
    assert G.sample(model, params, CFG, PROMPTS, max_new_tokens=NEW, rng=key, temperature=1.5, top_p=1e-6) == want
    # Negative control: plain sampling differs. Temperature, top-k, top-p and the key are traced.
    assert G.sample(model, params, CFG, PROMPTS, max_new_tokens=NEW, rng=key, temperature=1.5) != want
    assert model.traces == traces


def test_same_key_same_tokens_other_key_other_tokens_rows_independent_of_the_batch():
    params = params_for(CFG)
    run = functools.partial(G.sample, T, params, CFG, max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.95)
    a = run(PROMPTS, rng=jax.random.PRNGKey(0))
    assert run(PROMPTS, rng=jax.random.PRNGKey(0)) == a
    assert run(PROMPTS, rng=jax.random.key(0)) == a and run(PROMPTS, rng=0) == a  # typed key, int seed
    b = run(PROMPTS, rng=jax.random.PRNGKey(1))
    assert all(x != y for x, y in zip(a, b))
    # Row r is keyed by its index: the same rows without the last prompt, or with another one.
    assert run(PROMPTS[:2], rng=0) == a[:2]
    assert run(PROMPTS[:2] + ((9, 9, 9),), rng=0)[:2] == a[:2]
    # Equal prompts at different indices draw independently.
    twice = run([PROMPTS[0]] * 2, rng=0)
    assert twice[0] == a[0] and twice[1] != twice[0]


def reference_probs(logits, temperature, top_k, top_p):
    """Float64 NumPy of the rule: temperature; top-k keeps K = the k largest and every token tied with
    the k-th; top-p keeps the smallest prefix of K by decreasing probability (renormalised over K)
    whose mass reaches top_p, and every token tied with its last; top_p >= 1 keeps all of K."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    k = top_k or len(z)
    in_k = z >= z[order[k - 1]]
    p = np.where(in_k, np.exp(z - z[order[0]]), 0.0)
    p /= p.sum()
    n = in_k.sum() if top_p >= 1 else int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    kept = in_k & (z >= z[order[n - 1]])
    probs = np.where(kept, p, 0.0)
    return probs / probs.sum()


LOGITS = np.array([1.2, -0.4, 2.0, 0.3, 1.5, -1.0, 0.9, 0.0, -2.2, 1.1], np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, 0, 1.0),   # temperature alone: every token
    (1.0, 4, 1.0),   # top-k alone
    (1.0, 0, 0.6),   # top-p alone
    (1.6, 6, 0.8),   # all three
])
def test_filtered_sampler_matches_float64_distribution(temperature, top_k, top_p):
    want = reference_probs(LOGITS, temperature, top_k, top_p)
    kept = want > 0
    assert 1 < kept.sum() < len(LOGITS) or (top_k, top_p) == (0, 1.0)  # the filters really cut
    filtered = G.filter_logits(LOGITS, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(filtered), kept)
    np.testing.assert_allclose(jax.nn.softmax(filtered), want, atol=1e-6)
    # N draws through the sampler used in the loop: excluded tokens never appear, and the counts
    # fit the exact probabilities (chi-square, p-value > 1e-4: a 1-in-10^4 false alarm; the
    # key is fixed, so the outcome is deterministic). At N = 200k a frequency's standard error
    # is at most 0.0011, so a shift of 0.01 in any probability fails by a wide margin.
    n = 200_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = jax.jit(G.sample_logits)(keys, jnp.broadcast_to(LOGITS, (n, len(LOGITS))),
                                     jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    counts = np.bincount(np.asarray(draws), minlength=len(LOGITS))
    assert counts[~kept].sum() == 0
    assert stats.chisquare(counts[kept], n * want[kept]).pvalue > 1e-4
    assert np.max(np.abs(counts / n - want)) < 5 * np.sqrt(0.25 / n)


@pytest.mark.parametrize("logits,temperature,top_k,top_p,kept", [
    ([3, 1, 1, 1, 0], 1.0, 2, 0.8, 4),  # the top-p mass is renormalised over the k-set with its ties
    ([3, 1, 1, 1, 0], 1.0, 2, 0.7, 1),
    ([3, 1, 1, 1, 0], 1.0, 2, 1.0, 4),
    ([3, 1, 1, 1, 0], 1.0, 1, 1.0, 1),
    ([2, 2, 0, 0, -1], 0.5, 0, 0.5, 2),  # ties with the last token of the nucleus stay
    ([2, 2, 0, 0, -1], 2.0, 3, 0.9, 4),
    ([0, 1, 2, 3, 4, 4], 1.0, 0, 1.0, 6),
])
def test_filter_rule_with_ties_matches_float64(logits, temperature, top_k, top_p, kept):
    want = reference_probs(logits, temperature, top_k, top_p)
    assert (want > 0).sum() == kept
    filtered = jax.jit(G.filter_logits)(jnp.asarray(logits, jnp.float32), jnp.float32(temperature),
                                        jnp.int32(top_k), jnp.float32(top_p))  # traced, as in the loop
    np.testing.assert_array_equal(np.isfinite(filtered), want > 0)
    np.testing.assert_allclose(jax.nn.softmax(filtered), want, atol=1e-6)


def test_top_p_one_removes_nothing_on_a_large_vocabulary():
    """float32 cumulative sums reach 1 before the tail of 32k sorted probabilities; top_p = 1 must
    still keep every token (and every token of the top-k set)."""
    z = jnp.asarray(3 * np.random.default_rng(0).standard_normal(32_000), jnp.float32)
    run = jax.jit(G.filter_logits)
    assert bool(jnp.all(jnp.isfinite(run(z, jnp.float32(0.5), jnp.int32(0), jnp.float32(1.0)))))
    top = run(z, jnp.float32(0.5), jnp.int32(20_000), jnp.float32(1.0))
    np.testing.assert_array_equal(np.isfinite(top), np.asarray(z) >= np.sort(np.asarray(z))[-20_000])
    # Negative control: a top_p just below 1 does cut the tail.
    assert 0 < int(jnp.sum(~jnp.isfinite(run(z, jnp.float32(0.5), jnp.int32(0), jnp.float32(0.999))))) < 32_000


def test_complete_cuts_at_stop_strings_and_refuses_empty_texts():
    tok = ByteTokenizer()
    cfg = T.Config(**{**TINY, "vocab_size": tok.vocab_size})
    params, texts = params_for(cfg), ["Q:12+3", "hello world"]
    full = G.complete(T, params, cfg, tok, texts, max_new_tokens=12)
    ids = G.greedy(T, params, cfg, [[tok.bos_id] + tok.encode(t) for t in texts], max_new_tokens=12,
                   stop_token=tok.eos_id)
    assert full == [tok.decode(i) for i in ids]
    row = max(range(2), key=lambda i: len(full[i]))
    assert len(full[row]) >= 4
    stop = full[row][2:4]
    cut = G.complete(T, params, cfg, tok, texts, max_new_tokens=12, stop_strings=["never-emitted", stop])
    assert cut == [t[:t.find(stop)] if stop in t else t for t in full] and len(cut[row]) <= 2
    key = jax.random.PRNGKey(5)
    sampled = G.complete(T, params, cfg, tok, texts, max_new_tokens=12, rng=key, top_k=20)
    ids = G.sample(T, params, cfg, [[tok.bos_id] + tok.encode(t) for t in texts], max_new_tokens=12, rng=key,
                   top_k=20, stop_token=tok.eos_id)
    assert sampled == [tok.decode(i) for i in ids] != full
    with pytest.raises(ValueError, match="text 1 is ''"):
        G.complete(T, params, cfg, tok, ["a", ""], max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty strings"):
        G.complete(T, params, cfg, tok, ["a"], max_new_tokens=4, stop_strings=[""])


@pytest.mark.parametrize("kwargs,words", [
    ({"temperature": -1.0}, "temperature is -1.0"),
    ({"top_k": -1}, "top_k is -1"),
    ({"top_p": 0.0}, r"top_p is 0.0; use a value in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p is 1.5"),
    ({"rng": None}, "rng is None but temperature > 0"),
])
def test_sample_refuses_invalid_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        G.sample(T, params_for(CFG), CFG, PROMPTS, **{"max_new_tokens": NEW, "rng": 0, **kwargs})


# ----------------------------------------------------------------------------- sharded decoding

SHARD_CFG = T.Config(**{**TINY, "vocab_size": 64, "n_kv_heads": 4})  # divisible by tensor = 4


@functools.cache
def unsharded(seed=None):
    if seed is None:
        return G.greedy(T, params_for(SHARD_CFG), SHARD_CFG, PROMPTS, max_new_tokens=NEW)
    return G.sample(T, params_for(SHARD_CFG), SHARD_CFG, PROMPTS, max_new_tokens=NEW, rng=seed, top_p=0.9)


@pytest.mark.parametrize("mesh_cfg", [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_decoding_equals_one_device(mesh_cfg):
    mesh = pmesh.make_mesh(mesh_cfg)
    shardings = sharding.tree_shardings(T.param_axes(SHARD_CFG), mesh, DEFAULT_RULES)
    params = jax.device_put(params_for(SHARD_CFG), shardings)
    assert params["layers"]["wk"].sharding.spec[2] == "tensor"
    with sharding.activate(mesh, DEFAULT_RULES):
        # 3 prompts, filled up to a multiple of data x fsdp and cut back.
        assert G.greedy(T, params, SHARD_CFG, PROMPTS, max_new_tokens=NEW) == unsharded()
        got = G.sample(T, params, SHARD_CFG, PROMPTS, max_new_tokens=NEW, rng=7, top_p=0.9)
        assert got == unsharded(7) != unsharded()
        # The cache comes out split like its logical axes: rows over data (x fsdp), kv heads over tensor.
        tokens, positions, segment_ids = G.left_pad([list(p) for p in PROMPTS] + [[1]], 8)
        _, _, cache = G.decode_padded(T, params, SHARD_CFG, tokens, positions, segment_ids, None, NEW, width=8)
    spec = sharding.logical_to_spec(("layers", "batch", None, "kv_heads", "head_dim"), DEFAULT_RULES)
    assert cache["k"].sharding.is_equivalent_to(NamedSharding(mesh, spec), 5)
