"""Layer pruning (models/prune.py), NF4 and adapters (models/lora.py) and the compress command's pieces
(train/compress.py): angular distances against a direct NumPy loop, the captured last-token states against
the model, dropping zero layers as the identity and dropped layers as the shorter stack, NF4 levels from
the normal quantiles and its round-trip bound, NF4 against qwix's, zero-B adapters as the identity (with dropout
on), QLoRA healing through the trainer's train step with only the adapters trained, and the saved result loaded
back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from models import lora, prune, quant, weights
from models import transformer as T
from tests import helpers
from train import compress as C

pytestmark = pytest.mark.timeout(200)


def test_angular_distances_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(5, 3, 8)) + 0.5  # L = 4 layers, 3 rows
    d = prune.angular_distances(h)
    for n in range(1, 5):
        for l in range(4):
            if l + n > 4:
                assert np.isnan(d[n - 1, l])
                continue
            want = np.mean([np.arccos(h[l, r] @ h[l + n, r] / np.linalg.norm(h[l, r]) / np.linalg.norm(h[l + n, r]))
                            for r in range(3)]) / np.pi
            assert d[n - 1, l] == pytest.approx(want, abs=1e-12)
    assert prune.best_start(d, 2) == int(np.nanargmin(d[1]))
    assert prune.angular_distances(np.stack([h[0]] * 3))[0, 0] == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def dense():
    cfg = helpers.tiny("transformer", n_layers=3)
    params = helpers.random_params(cfg)
    toks = np.asarray(helpers.tokens(61, b=3, s=10, seed=4))
    states = prune.last_token_states(T, cfg, params, toks, last=np.array([9, 4, 7]), jit=helpers.jit)
    return cfg, params, toks, states


def test_last_token_states_and_dropping_layers(dense):
    cfg, params, toks, states = dense
    assert states.shape == (4, 3, cfg.d_model)
    rows = np.arange(3), np.array([9, 4, 7])
    np.testing.assert_allclose(states[0], np.asarray(params["embed"])[toks[rows]], rtol=1e-6)  # x_0: the embedding
    same, same_cfg = prune.drop_layers(params, cfg, 1, 0)
    assert same is params and same_cfg == cfg
    cut, cut_cfg = prune.drop_layers(params, cfg, 1, 1)  # layers 0, 2 remain: x_1 joined to x_2's successor
    assert cut_cfg.n_layers == 2
    np.testing.assert_array_equal(cut["layers"]["wq"][1], params["layers"]["wq"][2])

    @helpers.jit
    def by_hand(params, cut, toks):
        """Every layer's output, the logits of layers 0 and 2 run by hand, and the pruned model's logits."""
        pos = jnp.broadcast_to(jnp.arange(10), (3, 10))
        x = T.embed(params, toks, cfg)
        outs, y = [], x
        for layer in range(3):
            x, _, _ = T.block(jax.tree.map(lambda a: a[layer], params["layers"]), x, cfg, positions=pos)
            outs.append(x)
        for layer in (0, 2):
            y, _, _ = T.block(jax.tree.map(lambda a: a[layer], params["layers"]), y, cfg, positions=pos)
        return jnp.stack(outs), T.head(params, y, cfg), T.apply(cut, toks, cut_cfg)[0]

    outs, want, got = by_hand(params, cut, toks)
    np.testing.assert_allclose(states[1:], np.asarray(outs)[:, rows[0], rows[1]], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert prune.deepest_start(cfg, 1) == 1
    for start, n in ((0, 3), (2, 2), (-1, 1)):
        with pytest.raises(ValueError, match="layers"):
            prune.drop_layers(params, cfg, start, n)
    with pytest.raises(ValueError, match="whole units"):
        prune.drop_layers({}, helpers.tiny("switch", n_layers=4), 1, 1)


def test_nf4_levels_and_round_trip():
    # QLoRA's construction: 8 positive quantiles of N(0, 1) over linspace(delta, 1/2, 9)[:-1], 7 negative over
    # linspace(delta, 1/2, 8)[:-1], and zero; normalised by the largest.
    delta = 0.9677083
    pos, neg = norm.ppf(np.linspace(delta, 0.5, 9)[:-1]), -norm.ppf(np.linspace(delta, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(lora.NF4_LEVELS, levels / levels.max(), atol=2e-7)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 128, 10)).astype(np.float32)
    q = lora.nf4(jnp.asarray(w), block=64)
    assert q.codes.shape == (3, 64, 10) and q.absmax.shape == (3, 2, 10)
    back = np.asarray(q.dequantize(), np.float64)
    absmax = np.abs(w).reshape(3, 2, 64, 10).max(2, keepdims=True)
    normed = (w.reshape(3, 2, 64, 10) / absmax).reshape(w.shape)
    gaps = np.diff(lora.NF4_LEVELS.astype(np.float64))
    # each value lands on its nearest level: error at most half the gap around it, times its block's absmax
    i = np.clip(np.searchsorted(lora.NF4_LEVELS, normed), 1, 15)
    bound = np.maximum(gaps[i - 1], gaps[np.minimum(i, 14)]) / 2 * np.repeat(absmax, 64, axis=2).reshape(w.shape)
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6) + 1e-7)
    exact = lora.NF4_LEVELS[rng.integers(0, 16, (64, 4))] * 3.0
    exact[0] = 3.0  # every block's absmax is 3
    np.testing.assert_allclose(lora.nf4(jnp.asarray(exact)).dequantize(), exact, rtol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        lora.nf4(jnp.zeros((48, 2)), block=64)


def test_nf4_is_qwix_nf4_code_for_code():
    """qwix's NF4 (the levels of QLoRA's appendix E, absmax per block, nearest level) on the same weights gives the
    same codes, block scales and dequantized weights as ``lora.nf4``."""
    import qwix

    w = (np.random.default_rng(1).standard_t(4, size=(2, 256, 24)) * 0.02).astype(np.float32)
    ours = lora.nf4(jnp.asarray(w), block=64)
    theirs = qwix.quantize(jnp.asarray(w), "nf4", channelwise_axes=(0, 2), tiled_axes={1: 64})
    np.testing.assert_array_equal(quant.unpack_nibbles(ours.codes, 1), np.asarray(theirs.qvalue, np.uint8))
    np.testing.assert_array_equal(ours.absmax, theirs.scale)
    np.testing.assert_array_equal(ours.dequantize(), qwix.dequantize(theirs))


def test_zero_b_adapters_are_the_identity_even_with_dropout(dense):
    cfg, params, toks, _ = dense
    fwd = helpers.jit(lambda p, t: T.apply(p, t, cfg)[0])
    ref = fwd(params, toks)
    plain, axes = lora.qlora(params, T.param_axes(cfg), jax.random.PRNGKey(1), rank=4, quantize_base=False)
    assert isinstance(plain["layers"]["w_up"], lora.Adapter) and isinstance(plain["layers"]["wq"], jax.Array)
    assert jax.tree.structure(plain) == jax.tree.structure(axes, is_leaf=weights.is_axes)

    @helpers.jit
    def with_dropout(p, t):
        with lora.dropout_rng(jax.random.PRNGKey(3)):
            return T.apply(p, t, cfg)[0]

    np.testing.assert_array_equal(fwd(plain, toks), ref)
    np.testing.assert_array_equal(with_dropout(plain, toks), ref)
    # nonzero B: equals the merged float weights without dropout, differs with it
    b = jax.tree.map(lambda w: w.replace(b=jnp.ones_like(w.b) * 0.1) if isinstance(w, lora.Adapter) else w,
                     plain, is_leaf=lambda x: isinstance(x, weights.Weight))
    np.testing.assert_allclose(fwd(b, toks), fwd(lora.merge(b), toks), rtol=2e-5, atol=2e-5)
    assert helpers.rel_err(with_dropout(b, toks), fwd(b, toks)) > 1e-4


def test_healing_trains_only_the_adapters_and_the_result_round_trips(tmp_path):
    """Prune one layer of the tiny default experiment, heal 3 steps with QLoRA (NF4 base frozen) through the
    trainer (train.init_from = the pruned model's safetensors, train.adapters='qlora'), save, load."""
    config = helpers.tiny_train_config()
    mcfg = T.from_config(config.model)
    params = helpers.random_params(mcfg)
    from train import data
    tok = data.make_tokenizer(config.data)
    batches = C.token_batches(config, tok, "train", 16, 8, 64)
    calib = C.calibration_tokens(batches, 16)
    with pytest.raises(ValueError, match="requested"):
        C.calibration_tokens(batches, 17)
    opts = C.Options(method="prune", drop=1, heal_steps=3, rank=4, lr=1e-2, nf4_block=16)
    pruned, cfg, info = C.compress(T, mcfg, params, calib, opts, config=config, jit=helpers.jit)
    assert cfg.n_layers == 1
    assert info["start"] == int(np.argmin(np.asarray(info["distances"])[0, :2]))  # d(x_0, x_1) vs d(x_1, x_2)
    C.save(tmp_path / "pruned", pruned, cfg, info)
    healed, losses = C.heal(config, tmp_path / "pruned" / "model.safetensors", cfg.n_layers, opts,
                            str(tmp_path / "heal"))
    assert len(losses) == 3 and losses[-1] < losses[0]
    unhealed, _ = prune.drop_layers(params, mcfg, info["start"], 1)
    ad = healed["layers"]["w_down"]
    assert isinstance(ad, lora.Adapter) and isinstance(ad.base, lora.NF4)
    assert np.any(np.asarray(ad.b) != 0)  # the adapters trained ...
    np.testing.assert_array_equal(healed["layers"]["wq"], unhealed["layers"]["wq"])  # ... nothing else did
    np.testing.assert_array_equal(ad.base.codes, lora.nf4(unhealed["layers"]["w_down"], 16).codes)
    with pytest.raises(ValueError, match="model.n_layers|n_layers"):  # the trainer's model must be the pruned one
        C.heal(config, tmp_path / "pruned" / "model.safetensors", 2, opts, str(tmp_path / "heal2"))
    C.save(tmp_path / "out", healed, cfg, info)
    model, cfg2, loaded, info2 = C.load(tmp_path / "out")
    assert cfg2 == cfg and info2["start"] == info["start"]
    assert jax.tree.structure(loaded) == jax.tree.structure(healed)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(healed)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="method"):
        C.compress(T, mcfg, params, calib, C.Options(method="spqr"))
