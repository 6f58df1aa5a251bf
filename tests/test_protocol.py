"""Conformance of every model family to ``models.ModelFamily``: hooks and signatures, axes trees against
``init`` and ``init_cache``, apply = head(blocks(embed)) (with last_only, its last position), and a slice of the
layer stack run with its global ``layer_ids`` equals those units inside the whole stack (per-unit randomness
included)."""
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import weights
from parallel import mesh as pmesh
from tests import helpers

pytestmark = pytest.mark.timeout(200)

# Switch: 4 layers = 2 units of (dense, MoE), with expert dropout so that per-unit randomness shows.
CASES = {
    "transformer": helpers.tiny("transformer", n_layers=3),
    "mamba": helpers.tiny("mamba", n_layers=3),
    "switch": helpers.tiny("switch", n_layers=4, moe_expert_dropout=0.2, moe_capacity_factor_train=1.0),
}
HOOKS = [name for name in dir(models.ModelFamily) if not name.startswith("_") and name != "Config"]


def family(name):
    return models.get(helpers.FAMILY[name])


def test_every_hook_is_present_with_the_protocol_signature():
    assert set(HOOKS) >= {"from_config", "init", "param_axes", "embed", "blocks", "block", "head", "apply",
                          "init_cache", "cache_axes", "decode_params", "validate_mesh", "axis_sizes",
                          "layers_per_unit", "matmul_params", "flops_per_token"}
    for fam in models.FAMILIES:
        module = models.get(fam)
        assert isinstance(module, models.ModelFamily), fam
        assert isinstance(module.Config, type)
        for hook in HOOKS:
            want = list(inspect.signature(getattr(models.ModelFamily, hook)).parameters.values())[1:]  # no self
            got = list(inspect.signature(getattr(module, hook)).parameters.values())
            positional = [p for p in want if p.kind != p.KEYWORD_ONLY]
            # Positional parameters by position (names free), keyword-only ones by name, same kinds.
            assert [p.kind for p in got[:len(positional)]] == [p.kind for p in positional], (fam, hook)
            by_name = {p.name: p for p in got[len(positional):]}
            for p in want[len(positional):]:
                assert p.name in by_name and by_name[p.name].kind == p.kind, (fam, hook, p.name)
            for w, g in zip(want, got[:len(positional)] + [by_name[p.name] for p in want[len(positional):]]):
                if w.default is not inspect.Parameter.empty:
                    assert g.default is not inspect.Parameter.empty, (fam, hook, w.name)
            extra = [p for p in got[len(positional):] if p.name not in {q.name for q in want}]
            assert all(p.default is not inspect.Parameter.empty for p in extra), (fam, hook, extra)


@pytest.mark.parametrize("name", list(CASES))
def test_axes_trees_match_params_and_cache(name):
    cfg, model = CASES[name], family(name)
    params = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
    for tree, axes in ((params, model.param_axes(cfg)), (jax.eval_shape(lambda: model.init_cache(cfg, 2, 16)),
                                                           model.cache_axes(cfg))):
        assert jax.tree.structure(tree) == jax.tree.structure(axes, is_leaf=weights.is_axes)
        jax.tree.map(lambda leaf, names: None if leaf.ndim == len(names) else pytest.fail(f"{names} {leaf.shape}"),
                     tree, axes)
    assert model.from_config({"family": helpers.FAMILY[name], **helpers.TINY[name]}) == helpers.tiny(name)
    # axis_sizes: the config fields that size each activation axis.
    sizes = model.axis_sizes(cfg)
    assert sizes and all(getattr(cfg, field) == size for size, field in sizes.values())
    assert ("experts" in sizes) == (name == "switch")
    model.validate_mesh(cfg, pmesh.make_mesh({"data": 8}), (("batch", "data"),), tokens=64)  # nothing to refuse
    if name == "mamba":
        per_layer = jax.eval_shape(lambda: model.decode_params(model.init(cfg, jax.random.PRNGKey(0)), cfg))["layers"]
        assert len(per_layer) == cfg.n_layers and {"in_xz", "A"} <= set(per_layer[0]) and "A_log" not in per_layer[0]


def _pieces(name):
    cfg, model = CASES[name], family(name)
    units = jax.tree.leaves(jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))["layers"])[0].shape[0]
    assert units == (2 if name == "switch" else 3)

    def run(params, tokens, rng):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        kw = dict(positions=pos, train=True, rng=rng)
        logits, aux = model.apply(params, tokens, cfg, train=True, rng=rng)
        last, _ = model.apply(params, tokens, cfg, train=True, rng=rng, last_only=True)
        x = model.embed(params, tokens, cfg)
        whole, none, whole_aux = model.blocks(params["layers"], x, cfg, **kw)
        composed = model.head(params, whole, cfg)
        # The stack in two slices, each with its global unit ids.
        stack = params["layers"]
        first = jax.tree.map(lambda a: a[:1], stack)
        rest = jax.tree.map(lambda a: a[1:], stack)
        y_first, _, aux_first = model.blocks(first, x, cfg, layer_ids=np.array([0]), **kw)
        y, _, aux_rest = model.blocks(rest, y_first, cfg, layer_ids=np.arange(1, units), **kw)
        # One unit through ``block`` (blocks passes it fold_in(rng, index of the unit's last layer)).
        per = cfg.moe_every if getattr(cfg, "num_experts", 0) else 1
        one, _, one_aux = model.block(jax.tree.map(lambda a: a[0], stack), x, cfg,
                                      **{**kw, "rng": jax.random.fold_in(rng, per - 1)})
        return dict(logits=logits, last=last, aux=aux, composed=composed, whole=whole, whole_aux=whole_aux, none=none,
                    sliced=y, aux_first=aux_first, aux_rest=aux_rest, one=one, one_aux=one_aux, first_out=y_first)

    params = helpers.random_params(cfg)
    return helpers.jit(run)(params, helpers.tokens(cfg.vocab_size, s=8), jax.random.PRNGKey(3))


@pytest.mark.parametrize("name", list(CASES))
def test_apply_is_head_of_blocks_of_embed_and_slices_equal_the_whole_stack(name):
    out = _pieces(name)
    assert out["none"] is None
    np.testing.assert_allclose(out["composed"], out["logits"], rtol=1e-6, atol=1e-6)
    assert out["last"].shape == (out["logits"].shape[0], 1, out["logits"].shape[2])  # last_only: the last position
    np.testing.assert_allclose(out["last"], out["logits"][:, -1:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["sliced"], out["whole"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["one"], out["first_out"], rtol=1e-6, atol=1e-6)
    assert set(out["aux"]) == {"losses", "metrics"}
    chex.assert_trees_all_close(out["aux"], out["whole_aux"], rtol=1e-6)
    assert out["aux"]["losses"] or name != "switch"
    # The slices' metrics are the whole stack's, under the same global layer names; their losses add up.
    chex.assert_trees_all_close({**out["aux_first"]["metrics"], **out["aux_rest"]["metrics"]},
                                out["whole_aux"]["metrics"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(out["one_aux"], out["aux_first"], rtol=1e-5, atol=1e-7)
    if name == "switch":
        assert sorted(out["aux_rest"]["metrics"]) == sorted(f"moe/{m}/layer3" for m in (
            "aux_loss", "z_loss", "dropped_fraction", "load_min", "load_max", "load_entropy"))
        np.testing.assert_allclose(out["aux_first"]["losses"]["moe/loss"] + out["aux_rest"]["losses"]["moe/loss"],
                                   out["whole_aux"]["losses"]["moe/loss"], rtol=1e-5)
    for leaf in jax.tree.leaves(out["aux"]):
        assert leaf.dtype == jnp.float32 and leaf.shape == ()


def test_a_slice_with_other_layer_ids_draws_other_randomness():
    """Per-unit randomness comes from the ids passed in, not the position in the local stack: the second
    unit run alone as unit 0 drops other expert activations than as unit 1."""
    cfg, model = CASES["switch"], family("switch")
    params = helpers.random_params(cfg)
    x = helpers.jit(model.embed, static_argnums=2)(params, helpers.tokens(cfg.vocab_size, s=8), cfg)
    rest = jax.tree.map(lambda a: a[1:], params["layers"])

    @helpers.jit
    def run(x, rng):
        kw = dict(positions=jnp.broadcast_to(jnp.arange(8), (2, 8)), train=True, rng=rng)
        return (model.blocks(rest, x, cfg, layer_ids=np.array([1]), **kw)[0],
                model.blocks(rest, x, cfg, layer_ids=np.array([0]), **kw)[0])

    as_one, as_zero = run(x, jax.random.PRNGKey(3))
    assert np.abs(np.asarray(as_one - as_zero)).max() > 1e-4
