"""SmoothQuant (models/smoothquant.py) and the shared calibration (models/quant.py) on a tiny Switch model
(a dense and a Switch layer): batches combined exactly, smoothing scales against the NumPy formula and the
smoothed model against the float one, int8 products against int64 NumPy, every W8A8 form against a float64
NumPy reference of the same quantizer, the paper's outlier-channel effect, and the quantized model through
apply and generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate, quant, weights
from models import smoothquant as SQ
from models import transformer as T
from tests import helpers

pytestmark = pytest.mark.timeout(200)


@pytest.fixture(scope="module")
def model():
    """The tiny Switch model: layer 0 dense (norm -> W_gate, W_up), layer 1 Switch (norm -> router, experts)."""
    cfg = helpers.tiny("switch", n_layers=2)
    params = helpers.random_params(cfg)
    toks = np.asarray(helpers.tokens(61, b=4, s=16, seed=3))
    stats = quant.calibrate(T, cfg, params, toks, batch_size=4, jit=helpers.jit)
    fwd = helpers.jit(lambda p, t: T.apply(p, t, cfg)[0])
    return cfg, params, toks, stats, fwd, fwd(params, toks)


def test_calibration_combines_batches_exactly(model):
    cfg, params, toks, whole, _, _ = model
    stats = quant.calibrate(T, cfg, params, toks, batch_size=2, jit=helpers.jit)  # two batches of 2 rows
    for key in whole:
        for s in ("absmax", "mean_abs", "count"):
            np.testing.assert_allclose(stats[key][s], whole[key][s], rtol=1e-5, atol=1e-6, err_msg=f"{key} {s}")
    assert whole["layer0/wq"]["count"] == toks.size
    # per-expert statistics [N, in], every routed token counted once
    assert whole["layer1/w_gate"]["absmax"].shape == (cfg.num_experts, cfg.d_model)
    assert 0 < whole["layer1/w_gate"]["count"].sum() <= toks.size


def test_smoothing_is_exact_and_follows_the_formula(model):
    cfg, params, toks, stats, fwd, ref = model
    smoothed, scales = SQ.smooth(params, cfg, stats, alpha=0.5)
    assert helpers.rel_err(fwd(smoothed, toks), ref) < 2e-6
    # The MLP scales of layer 0 (dense) and layer 1 (Switch: every expert) from the NumPy formula.
    for layer, lay, new, key in ((0, jax.tree.map(lambda a: a[0, 0], params["layers"]["dense"]),
                                  jax.tree.map(lambda a: a[0, 0], smoothed["layers"]["dense"]), "w_gate"),
                                 (1, jax.tree.map(lambda a: a[0], params["layers"]["moe"]),
                                  jax.tree.map(lambda a: a[0], smoothed["layers"]["moe"]), "router")):
        x = stats[f"layer{layer}/{key}"]["absmax"].astype(np.float64)
        gate, up = (np.abs(np.asarray(lay[n], np.float64)).reshape(-1, cfg.d_model, cfg.d_ff)
                    for n in ("w_gate", "w_up"))
        w = np.maximum(gate.max(axis=(0, 2)), up.max(axis=(0, 2)))
        want = np.maximum(x, 1e-5) ** 0.5 / np.maximum(w, 1e-5) ** 0.5
        np.testing.assert_allclose(scales[f"layer{layer}/mlp"], want, rtol=1e-6)
        np.testing.assert_allclose(new["mlp_norm"], np.asarray(lay["mlp_norm"]) / want, rtol=1e-5)
        # After smoothing, max|X_j / s_j| and max|s_j W_j| meet at sqrt(max|X_j| max|W_j|) (alpha = 0.5).
        sm = SQ.smoothed_stats(stats, scales)[f"layer{layer}/{key}"]["absmax"]
        np.testing.assert_allclose(sm, np.sqrt(x * w), rtol=1e-5)


def test_int8_matmul_is_exact_against_int64_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(-127, 128, (5, 7, 384), dtype=np.int8)
    w = rng.integers(-127, 128, (384, 33), dtype=np.int8)
    x[0, 0], w[:, 0] = 127, 127  # the extreme sum 384 * 127^2
    got = quant.int8_matmul(jnp.asarray(x), jnp.asarray(w), (((2,), (0,)), ((), ())))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.int64) @ w.astype(np.int64))


def _reference(x, w, act, per_channel, a_scale):
    """float64 NumPy W8A8: symmetric int8 quantizers with the scales of each mode, int64 product."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    sw = np.abs(w).max(0, keepdims=True) / 127 if per_channel else np.abs(w).max() / 127
    sx = {"per_token": np.abs(x).max(-1, keepdims=True) / 127, "per_tensor": np.abs(x).max() / 127,
          "static": a_scale}[act]
    xq = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    wq = np.clip(np.round(w / sw), -127, 127).astype(np.int64)
    return (xq @ wq) * sx * sw


@helpers.jit
def _dense(w, x):
    return w.matmul(x, weights.Dot())


@helpers.jit
def _experts(w, x):
    return w.matmul(x, weights.Dot("experts"))


@helpers.jit
def _ragged(w, x, sizes):
    return w.matmul(x, weights.Dot("ragged", group_sizes=sizes))


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_w8a8_form_matches_the_numpy_reference(per_channel):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 40)).astype(np.float32)
    w = rng.normal(size=(40, 24)).astype(np.float32)
    for act in SQ.ACT_MODES:
        q, sw = SQ.quantize_weight(w, per_channel=per_channel, experts=False)
        a = np.float32(1.5 * np.abs(x).max() / 127)
        ww = SQ.W8A8(q, sw, jnp.asarray(a), act)
        want = _reference(x, w, act, per_channel, np.float64(a))
        np.testing.assert_allclose(_dense(ww, jnp.asarray(x)), want, rtol=2e-5, atol=2e-5, err_msg=act)
        # experts form: x [G, E, C, in], w [E, in, out]; static scale per expert
        xe = rng.normal(size=(2, 3, 4, 40)).astype(np.float32)
        we = rng.normal(size=(3, 40, 24)).astype(np.float32)
        qe, se = SQ.quantize_weight(we, per_channel=per_channel, experts=True)
        ae = (np.abs(xe).max(axis=(0, 2, 3)) / 127).astype(np.float32)
        got = _experts(SQ.W8A8(qe, se, jnp.asarray(ae), act), jnp.asarray(xe))
        for e in range(3):
            xs = xe[:, e]
            want_e = _reference(xs, we[e], act, per_channel, np.float64(ae[e]))
            if act == "per_tensor":  # one scale over the whole activation tensor, all experts
                sx = np.abs(xe.astype(np.float64)).max() / 127
                sw = (np.abs(we[e]).max(0, keepdims=True) if per_channel else np.abs(we[e]).max()) / 127
                want_e = (np.clip(np.round(xs / sx), -127, 127) @ np.clip(np.round(we[e] / sw), -127, 127)) * sx * sw
            np.testing.assert_allclose(got[:, e], want_e, rtol=2e-5, atol=2e-5, err_msg=f"experts {act}")
        # ragged form (rows sorted by expert) equals the same rows through the experts' own weights
        sizes = np.array([3, 0, 2])
        xr = rng.normal(size=(5, 40)).astype(np.float32)
        got = _ragged(SQ.W8A8(qe, se, jnp.asarray(ae), act), jnp.asarray(xr), jnp.asarray(sizes))
        rows = np.repeat(np.arange(3), sizes)
        for r in range(5):
            sx_r = {"per_token": np.abs(xr[r]).max() / 127, "per_tensor": np.abs(xr).max() / 127,
                    "static": ae[rows[r]]}[act]
            sw = (np.abs(we[rows[r]]).max(0) if per_channel else np.abs(we[rows[r]]).max()) / 127
            want_r = (np.clip(np.round(xr[r] / sx_r), -127, 127) @ np.clip(np.round(we[rows[r]] / sw), -127, 127)) \
                * sx_r * sw
            np.testing.assert_allclose(got[r], want_r, rtol=1e-4, atol=1e-4, err_msg=f"ragged {act}")


def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    """A few input channels 50-100x larger (SmoothQuant fig. 4): migrating them into the weights cuts the
    W8A8 output error several-fold (measured: O1 3.0x, O2/O3 5.5x at this size)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 512)).astype(np.float32)
    out = rng.choice(512, 4, replace=False)
    x[:, out] *= rng.uniform(50, 100, size=4)
    w = (rng.normal(size=(512, 256)) / np.sqrt(512)).astype(np.float32)
    ref = x.astype(np.float64) @ w
    s = SQ.smoothing_scales(np.abs(x).max(0), np.abs(w).max(1), 0.5)

    def err(x, w, act):
        q, sw = SQ.quantize_weight(w, per_channel=False, experts=False)
        y = _dense(SQ.W8A8(q, sw, jnp.asarray(np.abs(x).max() / 127, jnp.float32), act), jnp.asarray(x))
        return helpers.rel_err(y, ref)

    for act, factor in (("per_token", 2.5), ("per_tensor", 4.0), ("static", 4.0)):
        naive, smooth = err(x, w, act), err((x / s).astype(np.float32), (w * s[:, None]).astype(np.float32), act)
        assert naive > factor * smooth, (act, naive, smooth)


def test_quantized_model_runs_through_apply_and_generate(model):
    cfg, params, toks, stats, fwd, ref = model
    smoothed, scales = SQ.smooth(params, cfg, stats)
    axes = T.param_axes(cfg)
    for act in ("O1", "O3"):
        qp, qa = SQ.quantize(smoothed, axes, cfg, act=act, stats=SQ.smoothed_stats(stats, scales),
                             per_channel=act == "O1")
        assert jax.tree.structure(qp) == jax.tree.structure(qa, is_leaf=weights.is_axes)
        assert helpers.rel_err(fwd(qp, toks), ref) < 0.05, act
    assert isinstance(qp["layers"]["moe"]["w_gate"], SQ.W8A8) and isinstance(qp["layers"]["dense"]["wq"], SQ.W8A8)
    # decoding runs the dropless (ragged) expert path with static per-expert scales
    out = generate.greedy(T, qp, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=3)
    assert [len(o) for o in out] == [3, 3]


def test_bad_input_is_refused():
    cfg = helpers.tiny("transformer")
    with pytest.raises(ValueError, match="alpha"):
        SQ.smooth({"layers": {}}, cfg, {}, alpha=1.5)
    with pytest.raises(ValueError, match="stats="):
        SQ.quantize({}, {}, cfg, act="O3")
    with pytest.raises(ValueError, match="transformer family"):
        SQ.smooth({}, helpers.tiny("mamba"), {})
    with pytest.raises(ValueError, match="shorter|requested"):
        quant.calibration_rows(np.arange(100), 4, 32)
