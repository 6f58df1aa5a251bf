"""Weight types in ``layers.linear``: every form (dense, transposed, experts, ragged, embedding rows) of a
LoRA weight against float64 NumPy, and whole models with every matmul weight wrapped in a zero-B LoRA
giving the plain model's logits exactly, on one device and sharded from the axes tree on 8 devices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import layers, weights
from parallel import mesh as pmesh
from parallel import sharding
from tests import helpers

pytestmark = pytest.mark.timeout(300)

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("mlp", "tensor"), ("vocab", "tensor"), ("inner", "tensor"), ("experts", "expert"), ("lora", None))
# Every parameter name of the families: the projections (through ``linear``) and the rest.
MATMULS = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "router", "head",
           "in_x", "in_z", "x_proj", "dt_proj", "out_proj"}
OTHERS = {"attn_norm", "mlp_norm", "final_norm", "norm", "conv_w", "conv_b", "dt_bias", "A_log", "D", "in_x_bias",
          "in_z_bias", "out_bias"}
CASES = {
    "transformer": helpers.tiny("transformer", vocab_size=64),
    "switch": helpers.tiny("switch", vocab_size=64),
    "switch_dropless": helpers.tiny("switch", vocab_size=64, moe_dispatch="dropless", tie_embeddings=True),
    # Tied embeddings (Mamba's default). dt_rank 4: with dt_rank 1 the dt projection is a broadcast multiply,
    # which XLA fuses with the bias add into one FMA in one sharded program and not the other (1 ulp).
    "mamba": helpers.tiny("mamba", vocab_size=64, proj_bias=True, dt_rank=4),
}


def f64(a):
    return np.asarray(a, np.float64)


def lora_of(shape, rank=3, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    base, a, b = (jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2]), jnp.float32)
                  for s in (shape, (*shape[:-1], rank), (*shape[:-2], rank, shape[-1])))
    return weights.LoRA(base, a, b, scale)


def merged(w):
    """base + scale a b in float64."""
    return f64(w.base) + w.scale * f64(w.a) @ f64(w.b)


def test_every_form_of_a_lora_weight_equals_the_merged_weight_in_float64():
    rng = np.random.default_rng(1)
    w = lora_of((24, 40))
    x = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(layers.linear(w, x), f64(x) @ merged(w), **tol)
    # The delta alone is exactly x a b scale: the base part cancels.
    plain = layers.linear(w.base, x)
    np.testing.assert_allclose(layers.linear(w, x) - plain, w.scale * f64(x) @ f64(w.a) @ f64(w.b), rtol=1e-4,
                               atol=1e-6)
    t = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)  # tied head: x @ W.T
    out = layers.linear(w, t, out_dtype=jnp.float32, transpose=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, f64(t) @ merged(w).T, **tol)
    tokens = jnp.array([[3, 0, 23]])
    np.testing.assert_allclose(layers.embed_lookup(w, tokens, jnp.float32), merged(w)[np.asarray(tokens)], **tol)
    ew = lora_of((4, 24, 40), seed=2)  # experts: [G, E, C, in] x [E, in, out]
    buf = jnp.asarray(rng.normal(size=(3, 4, 5, 24)), jnp.float32)
    np.testing.assert_allclose(layers.linear(ew, buf, experts=True),
                               np.einsum("gecd,edf->gecf", f64(buf), merged(ew)), **tol)
    sizes = jnp.array([2, 0, 3, 1], jnp.int32)  # ragged: rows sorted by expert
    rows = jnp.asarray(rng.normal(size=(6, 24)), jnp.float32)
    want = np.concatenate([f64(rows[i:j]) @ merged(ew)[e] for e, (i, j) in enumerate([(0, 2), (2, 2), (2, 5),
                                                                                      (5, 6)])])
    np.testing.assert_allclose(layers.linear(ew, rows, group_sizes=sizes), want, **tol)
    # A weight type nests: LoRA over a LoRA base.
    nested = weights.LoRA(w, w.a, w.b, 0.25)
    np.testing.assert_allclose(layers.linear(nested, x), f64(x) @ (merged(w) + 0.25 * f64(w.a) @ f64(w.b)), **tol)


def test_a_decoder_layer_with_a_lora_weight_equals_the_merged_weight():
    """One Transformer layer with LoRA W_o and W_down (nonzero B) against the plain layer with the merged
    weights (float64 merge), and the change of a Mamba layer's output against the same merge."""
    cfg = helpers.tiny("transformer")
    model = models.get("transformer")
    p = jax.tree.map(lambda a: a[0], helpers.random_params(cfg)["layers"])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    wo = weights.lora_init(p["wo"], ("heads", "embed"), jax.random.PRNGKey(1), rank=4, scale=2.0, zero_b=False)[0]
    wd = weights.lora_init(p["w_down"], ("mlp", "embed"), jax.random.PRNGKey(2), rank=4, scale=0.5, zero_b=False)[0]
    layer = helpers.jit(lambda p, x: model.decoder_layer(p, x, cfg, positions=pos)[0])
    got = layer({**p, "wo": wo, "w_down": wd}, x)
    want = layer({**p, "wo": jnp.asarray(merged(wo), jnp.float32), "w_down": jnp.asarray(merged(wd), jnp.float32)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got - layer(p, x))).max() > 1e-2  # B matters


def wrap_all(params, axes, *, zero_b=True):
    """Every matmul weight wrapped in a rank-2 LoRA (B zero unless ``zero_b`` is False); the tied table too."""
    tied = "head" not in params

    def where(path, names):
        leaf = path.split("/")[-1]
        assert leaf in MATMULS | OTHERS | {"embed"}, path  # every parameter is known
        return leaf in MATMULS or (leaf == "embed" and tied)

    def make(path, w, names):
        return weights.lora_init(w, names, jax.random.fold_in(jax.random.PRNGKey(5), len(path)), rank=2,
                                 scale=0.7, zero_b=zero_b)

    return weights.wrap(params, axes, make, where)


@pytest.mark.parametrize("name", list(CASES))
def test_zero_b_lora_everywhere_gives_identical_logits_also_sharded_on_8_devices(name):
    cfg = CASES[name]
    model = models.get(helpers.FAMILY[name.split("_")[0]])
    params, axes = helpers.random_params(cfg), model.param_axes(cfg)
    wrapped, wrapped_axes = wrap_all(params, axes)
    n_lora = sum(isinstance(w, weights.LoRA) for w in jax.tree.leaves(
        wrapped, is_leaf=lambda t: isinstance(t, weights.LoRA)))
    assert n_lora == sum(1 for p in jax.tree_util.tree_flatten_with_path(params)[0]
                         if p[0][-1].key in MATMULS or (p[0][-1].key == "embed" and "head" not in params))
    # The axes tree mirrors the params: same structure, one name per dimension, the rank axis 'lora'.
    assert jax.tree.structure(wrapped) == jax.tree.structure(wrapped_axes, is_leaf=weights.is_axes)
    jax.tree.map(lambda w, names: None if w.ndim == len(names) else pytest.fail(f"{names} {w.shape}"),
                 wrapped, wrapped_axes)
    toks = helpers.tokens(cfg.vocab_size, b=4, s=8)
    forward = lambda p, t: model.apply(p, t, cfg)[0]  # noqa: E731
    plain = helpers.jit(forward)(params, toks)
    np.testing.assert_array_equal(helpers.jit(forward)(wrapped, toks), plain)

    mesh = pmesh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.activate(mesh, RULES):
        batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None), RULES))
        runs = {}
        for key, p, ax in (("plain", params, axes), ("lora", wrapped, wrapped_axes)):
            shardings = sharding.tree_shardings(ax, mesh, RULES)
            placed = jax.device_put(p, shardings)
            runs[key] = helpers.jit(forward, in_shardings=(shardings, batch))(placed, jax.device_put(toks, batch))
    lora_a = [w.a for w in jax.tree.leaves(placed, is_leaf=lambda t: isinstance(t, weights.LoRA))
              if isinstance(w, weights.LoRA)]
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated for a in lora_a)
    np.testing.assert_array_equal(runs["lora"], runs["plain"])
    np.testing.assert_allclose(runs["plain"], plain, rtol=1e-5, atol=1e-5)
    # And B matters: nonzero B changes the logits.
    moved, _ = wrap_all(params, axes, zero_b=False)
    assert np.abs(np.asarray(helpers.jit(forward)(moved, toks) - plain)).max() > 1e-3


def test_lora_axes_and_decode_layout():
    """lora_init's axes: a [..., in, lora], b [..., lora, out] after the leading axes; decode_params leaves
    weight types unfused (fusing would need the merged weight)."""
    w = jnp.zeros((3, 2, 8, 6))
    lora, axes = weights.lora_init(w, ("layers", "sublayers", "embed", "mlp"), jax.random.PRNGKey(0), rank=2)
    assert (axes.base, axes.a, axes.b) == (("layers", "sublayers", "embed", "mlp"),
                                           ("layers", "sublayers", "embed", "lora"),
                                           ("layers", "sublayers", "lora", "mlp"))
    assert lora.a.shape == (3, 2, 8, 2) and lora.b.shape == (3, 2, 2, 6) and not np.any(np.asarray(lora.b))
    cfg = helpers.tiny("transformer")
    model = models.get("transformer")
    params, _ = wrap_all(helpers.random_params(cfg), model.param_axes(cfg))
    per_layer = model.decode_params(params, cfg)["layers"]
    assert "wq" in per_layer[0] and "wqkv" not in per_layer[0] and isinstance(per_layer[0]["wq"], weights.LoRA)
    assert dataclasses.is_dataclass(lora)
