"""The Transformer with Switch layers (a config of models/transformer.py): forward against a manual
composition of dense blocks and ``moe.apply``, aux losses in the train objective, trainer metrics,
expert-parallel training on 8 host devices, cached generation, and config errors."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_switch_350m, dense_stdlib, switch_stdlib
from models import capture, generate, layers, moe
from models import transformer as T
from parallel import mesh as pmesh
from parallel import sharding
from tests.helpers import DEFAULT_CODEGEN
from train import config as config_lib
from train import metrics, objective as objective_lib, step as step_lib, trainer
from train.setup import setup_training

pytestmark = pytest.mark.timeout(120)

TINY = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32",
            num_experts=4, moe_every=2, moe_group_size=8, moe_capacity_factor_train=1.0,
            moe_capacity_factor_eval=1.0, moe_expert_dropout=0.1, moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)


def tiny(**kw):
    return T.Config(**{**TINY, **kw})


def random_params(cfg, seed=0):
    """Params of ``init``'s structure drawn with NumPy (no compile): N(0, 1/fan_in) matrices, a router wide
    enough to keep routing far from ties, random norm scales so that every weight matters."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name.endswith("norm"):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        std = 0.5 if name == "router" else 1.0 if name == "embed" else s.shape[-2] ** -0.5
        return jnp.asarray(rng.normal(0, std, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: T.init(cfg, jax.random.PRNGKey(0))))


def tokens(cfg, b=2, s=12, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, s), 0, cfg.vocab_size)


def moe_part(p):
    return {k: p[k] for k in ("router", *moe.EXPERT_WEIGHTS)}


def manual_forward(params, toks, cfg, *, train, rng=None):
    """embed -> per layer: a dense ``decoder_layer``, or attention (a layer with a zero MLP) + moe.apply -> head.
    Returns (logits, {metric: [n_moe] per-layer values}, every layer's input and the last output)."""
    x = T.embed(params, toks, cfg)
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    stack, every = params["layers"], cfg.moe_every
    d, f = cfg.d_model, cfg.d_ff
    aux, hidden = [], []
    for i in range(cfg.n_layers):
        hidden.append(x)
        u, j = divmod(i, every)
        if j < every - 1:  # dense layer j of unit u
            x, _, _ = T.decoder_layer(jax.tree.map(lambda a: a[u, j], stack["dense"]), x, cfg, positions=pos)
            continue
        p = jax.tree.map(lambda a: a[u], stack["moe"])
        attn_only = {k: v for k, v in p.items() if k not in ("router", *moe.EXPERT_WEIGHTS)}
        attn_only.update(w_gate=jnp.zeros((d, f)), w_up=jnp.zeros((d, f)), w_down=jnp.zeros((f, d)))
        h, _, _ = T.decoder_layer(attn_only, x, cfg, positions=pos)
        y, a = moe.apply(moe_part(p), layers.rms_norm(h, p["mlp_norm"], cfg.norm_eps), cfg.moe, train=train,
                         rng=None if rng is None else jax.random.fold_in(rng, i))
        x = h + y
        aux.append(a)
    hidden.append(x)
    return T.head(params, x, cfg), jax.tree.map(lambda *a: jnp.stack(a), *aux), jnp.stack(hidden)


def named(per_layer, layer_ids):
    """{'moe/<metric>/layer<i>': value} from {metric: [n]} at layer ids [n]."""
    return {f"moe/{k}/layer{i}": v[n] for k, v in per_layer.items() for n, i in enumerate(layer_ids)}


def test_structure_axes_and_active_flops():
    cfg = tiny()
    params = jax.eval_shape(lambda: T.init(cfg, jax.random.PRNGKey(0)))
    assert T.moe_layer_ids(cfg) == (1, 3) and set(params["layers"]) == {"dense", "moe"}
    # Units of moe_every = 2 layers (dense, MoE) on the leading axis; the dense ones [units, moe_every - 1, ...].
    chex.assert_shape([params["layers"]["dense"]["w_gate"], params["layers"]["moe"]["w_gate"],
                       params["layers"]["moe"]["router"], params["layers"]["moe"]["wq"]],
                      [(2, 1, 32, 48), (2, 4, 32, 48), (2, 32, 4), (2, 32, 32)])
    assert T.param_axes(cfg)["layers"]["dense"]["wq"] == ("layers", "sublayers", "embed", "heads")
    # The layers are the dense model's with the same key, sorted into the units.
    init = jax.jit(T.init, static_argnums=0, compiler_options=DEFAULT_CODEGEN)  # bitwise across two programs
    dense_init = init(T.Config(**{**TINY, "num_experts": 0}), jax.random.PRNGKey(0))["layers"]
    real = init(cfg, jax.random.PRNGKey(0))["layers"]
    np.testing.assert_array_equal(real["dense"]["wq"][:, 0], dense_init["wq"][np.array([0, 2])])
    np.testing.assert_array_equal(real["moe"]["wq"], dense_init["wq"][np.array([1, 3])])
    axes = T.param_axes(cfg)
    is_names = lambda t: isinstance(t, tuple)  # noqa: E731
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_names)
    assert all(p.ndim == len(a) for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_names)))
    assert "dense" not in jax.eval_shape(lambda: T.init(tiny(moe_every=1, n_layers=2), jax.random.PRNGKey(0)))["layers"]
    dense = T.Config(**{**TINY, "num_experts": 0})
    # Active parameters: top_k experts and the router per MoE layer, not all experts.
    assert T.matmul_params(cfg) == T.matmul_params(dense) + 2 * 32 * 4
    assert T.matmul_params(tiny(moe_top_k=2)) == T.matmul_params(dense) + 2 * (3 * 32 * 48 + 32 * 4)
    assert T.flops_per_token(cfg, 100) - 6 * T.matmul_params(cfg) == T.flops_per_token(dense, 100) - 6 * \
        T.matmul_params(dense)


def test_forward_equals_dense_blocks_plus_moe_layers():
    """Train mode (training capacity, expert dropout keyed by fold_in(rng, layer)); 4 layers: D M D M."""
    cfg = tiny()
    params, toks = random_params(cfg), tokens(cfg)

    def forward(p, t, r):
        with capture.taps(hidden=True) as got:  # the unrolled layers of a capture ...
            _, aux_unrolled = T.apply(p, t, cfg, train=True, rng=r)
        logits, aux = T.apply(p, t, cfg, train=True, rng=r)  # ... and the scan
        return logits, aux, aux_unrolled, capture.stack_hidden(got.hidden)

    f = jax.jit(forward)
    logits, aux, aux_unrolled, hidden = f(params, toks, jax.random.PRNGKey(7))
    want, want_aux, want_hidden = jax.jit(lambda p, t, r: manual_forward(p, t, cfg, train=True, rng=r))(
        params, toks, jax.random.PRNGKey(7))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert set(aux) == {"losses", "metrics"} and set(aux["losses"]) == {"moe/loss"}
    chex.assert_trees_all_close(aux["metrics"], named(want_aux, (1, 3)), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(aux_unrolled, aux, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["losses"]["moe/loss"], jnp.sum(want_aux["aux_loss"] + want_aux["z_loss"]),
                               rtol=1e-5)
    chex.assert_shape(hidden, (5, 2, 12, 32))
    np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5)
    assert float(want_aux["dropped_fraction"].max()) > 0  # capacity factor 1: the test drops tokens
    other, *_ = f(params, toks, jax.random.PRNGKey(8))  # expert dropout: another key, other logits
    assert np.abs(np.asarray(other - logits)).max() > 1e-4


def test_aux_losses_reach_the_objective_and_the_router():
    cfg = tiny(moe_expert_dropout=0.0)  # dense, MoE, dense, MoE
    params, toks = random_params(cfg), tokens(cfg, b=2, s=16)
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, axis=1), "loss_mask": jnp.ones_like(toks)}
    lm = objective_lib.lm_objective(loss_chunk=0)
    out = jax.jit(lambda p, b: lm.loss(T, cfg, p, b, train=True))(params, batch)
    metrics = out.means
    assert float(out.weight) == 32 and metrics["moe/aux_loss/layer1"].shape == ()
    np.testing.assert_allclose(metrics["moe/loss"], sum(metrics[f"moe/{k}/layer{i}"] for k in ("aux_loss", "z_loss")
                                                        for i in (1, 3)), rtol=1e-6)
    np.testing.assert_allclose(out.total, out.sums["loss"] + out.weight * metrics["moe/loss"], rtol=1e-6)

    def first_moe_layer_loss(p):  # the auxiliary losses of layer 1 alone
        m = T.apply(p, toks, cfg, train=True)[1]["metrics"]
        return m["moe/aux_loss/layer1"] + m["moe/z_loss/layer1"]

    grads = jax.jit(jax.grad(first_moe_layer_loss))(params)
    # A gradient on layer 1's router and on the layer below it, none on the layers above it or on experts.
    assert float(jnp.abs(grads["layers"]["moe"]["router"][0]).max()) > 0
    assert float(jnp.abs(grads["layers"]["dense"]["w_gate"][0]).max()) > 0
    assert float(jnp.abs(grads["layers"]["dense"]["w_gate"][1]).max()) == 0
    assert float(jnp.abs(grads["layers"]["moe"]["router"][1]).max()) == 0
    assert float(jnp.abs(grads["layers"]["moe"]["w_gate"]).max()) == 0
    # A family without MoE layers (empty losses) adds nothing.
    assert float(objective_lib.aux_parts({"losses": {}, "metrics": {}})[0]) == 0


def tiny_run_config(module, **model):
    c = module.get_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32", **model)
    if c.model.get("num_experts"):
        c.model.moe_group_size = 64
    c.data.max_files = 40
    c.train.update(steps=3, batch_size=8, seq_len=64, log_every=1, eval_every=3, eval_batches=1, ckpt_every=3,
                   progress=False)
    c.optim.warmup_steps = 1
    return c


@pytest.mark.parametrize("module", [switch_stdlib, dense_stdlib])
def test_experiment_smoke_logs_moe_metrics(module, tmp_path):
    c = tiny_run_config(module)
    if module is dense_stdlib:  # one layer: the shapes of the switch run's dense layer (cached slicing in saves)
        c.model.n_layers = 1
        c.train.eval_every = 0  # the dense eval step is the trainer tests' business
    result = trainer.run(c, str(tmp_path))
    assert result["step"] == 3 and result["loss"] > 0
    records = metrics.read_jsonl(str(tmp_path))
    last = [r for r in records if "loss" in r][-1]
    if module is dense_stdlib:
        assert not any(k.startswith("moe/") for k in last) and not (tmp_path / "moe.png").exists()
        return
    assert "eval_loss" in result
    for name in ("dropped_fraction", "load_min", "load_max", "load_entropy", "aux_loss", "z_loss"):
        assert 0 <= last[f"moe/{name}/layer1"] <= 1, name
    assert last["moe/loss"] == pytest.approx(last["moe/aux_loss/layer1"] + last["moe/z_loss/layer1"], rel=1e-5)
    assert (tmp_path / "moe.png").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model"]["num_experts"] == 8
    evals = [r for r in records if "eval_loss" in r][-1]
    for name in ("dropped_fraction", "load_max", "aux_loss"):
        assert 0 <= evals[f"eval_moe/{name}/layer1"] <= 1, name


def test_eval_step_reports_moe_metrics_at_the_eval_capacity():
    """The eval step runs the layers in eval mode: its dropped fraction follows moe_capacity_factor_eval
    (capacity = the whole group at factor num_experts: nothing dropped), not the training factor."""
    toks = np.random.default_rng(0).integers(3, 61, (4, 9)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((4, 8), np.int32)}
    dropped = {}
    for factor in (0.25, 4.0):
        cfg = tiny(moe_capacity_factor_train=0.25, moe_capacity_factor_eval=factor)
        out = jax.jit(step_lib.make_eval_step(T, cfg, objective_lib.lm_objective(loss_chunk=0)))(
            random_params(cfg), batch)["means"]
        assert sorted(k for k in out if k.startswith("moe/dropped")) == [
            f"moe/dropped_fraction/layer{i}" for i in (1, 3)]
        dropped[factor] = [float(out[f"moe/dropped_fraction/layer{i}"]) for i in (1, 3)]
    assert dropped[4.0] == [0.0, 0.0]
    assert min(dropped[0.25]) >= 0.5  # capacity 1 of 8 tokens per expert of 4: at least half dropped


def test_expert_parallel_loss_and_grads_equal_one_device():
    """The train step's objective (LM loss + aux losses, train mode) and its gradients on a data=2 x expert=4
    mesh, experts exchanged by all_to_all, against one device."""
    c = tiny_run_config(switch_stdlib, moe_capacity_factor_train=1.0)  # (dropout on a mesh: tests/test_moe.py)
    c.model.update(n_layers=1, moe_every=1, moe_group_size=32)  # one MoE layer; 16 groups: 2 per device
    one = setup_training(c, pmesh.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    toks = np.random.default_rng(0).integers(3, 259, (8, 65)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((8, 64), np.int32)}
    params = random_params(one.mcfg)
    objective = step_lib.make_grad_fn(T, one.mcfg, one.objective)
    rng = jax.random.PRNGKey(3)
    aux, grads = jax.jit(objective)(params, batch, rng)
    assert float(aux.means["moe/dropped_fraction/layer0"]) > 0
    c.mesh.update(data=2, expert=4)
    ep = setup_training(c, pmesh.make_mesh(c.mesh))
    with sharding.activate(ep.mesh, ep.rules):
        placed = jax.device_put(params, ep.state_shardings.params)
        sharded_batch = sharding.global_batch(batch, ep.mesh, ep.rules)
        lowered = jax.jit(objective).lower(placed, sharded_batch, rng)
        assert "all_to_all" in lowered.as_text()
        aux_ep, grads_ep = lowered.compile()(placed, sharded_batch, rng)
    assert grads_ep["layers"]["moe"]["w_gate"].sharding.spec[1] == "expert"
    np.testing.assert_allclose(aux_ep.total, aux.total, rtol=1e-5)
    chex.assert_trees_all_close(aux_ep, aux, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads_ep, grads, rtol=1e-4, atol=1e-5)  # summed (not mean) loss: grads ~1


def test_generation_equals_full_forward_dropless():
    # Layers: dense, MoE. A capacity config: decoding takes the dropless path anyway.
    cfg = tiny(n_layers=2, moe_dispatch="capacity", moe_expert_dropout=0.0)
    dropless = tiny(n_layers=2, moe_dispatch="dropless", moe_expert_dropout=0.0)
    params, toks = random_params(cfg), tokens(cfg, s=10)
    forward = jax.jit(lambda p, t: T.apply(p, t, dropless)[0])
    full = forward(params, toks)
    apply = jax.jit(lambda p, t, c: T.apply(p, t, cfg, cache=c))
    per_layer = T.decode_params(params, cfg)  # what generate runs: per-layer weights, fused wqkv
    out, aux = apply(per_layer, toks[:, :6], T.init_cache(cfg, 2, 16))
    steps = [out]
    for i in range(6, 10):
        out, aux = apply(per_layer, toks[:, i:i + 1], aux["cache"])
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    assert [k for k in aux["metrics"] if "dropped" in k] == ["moe/dropped_fraction/layer1"]
    assert float(aux["metrics"]["moe/dropped_fraction/layer1"]) == 0
    prompts = [[5, 9, 14, 3], [7, 1]]  # left-padded to one length
    new = generate.greedy(T, params, cfg, prompts, max_new_tokens=6)
    seqs = jnp.asarray([prompts[0] + new[0], prompts[1] + new[1] + [0, 0]], jnp.int32)  # 10 tokens, as above
    argmax = np.asarray(jnp.argmax(forward(params, seqs), axis=-1))
    assert new[0] == argmax[0, 3:9].tolist() and new[1] == argmax[1, 1:7].tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=2, moe_top_k=3), r"model.moe_top_k \(3\) exceeds model.num_experts \(2\)"),
    (dict(moe_capacity_factor_train=0.0), r"model.moe_capacity_factor_train is 0.0 but the capacity path"),
    (dict(moe_dispatch="sorted"), r"model.moe_dispatch is 'sorted'"),
    (dict(num_experts=-1), r"model.num_experts is -1"),
    (dict(moe_every=6), r"model.moe_every \(6\) exceeds model.n_layers \(4\)"),
    (dict(n_layers=5), r"model.n_layers \(5\) is not a multiple of model.moe_every \(2\)"),
    (dict(moe_every=0), r"model.moe_every is 0"),
])
def test_model_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_model_moe_fields_mirror_the_layer_config():
    """Every MoEConfig field has its Config field, with the same default, except the two the model
    sets on purpose: num_experts (0: dense) and moe_every (2: Switch's every other layer)."""
    import dataclasses

    layer = {f.name: f.default for f in dataclasses.fields(moe.MoEConfig)}
    model = {f.name: f.default for f in dataclasses.fields(T.Config)}
    for name, default in layer.items():
        field = name if name == "num_experts" else f"moe_{name}"
        assert field in model, field
        if name not in ("num_experts", "every"):
            assert model[field] == default, (field, model[field], default)
    assert (model["num_experts"], model["moe_every"]) == (0, 2)


def test_dense_ignores_moe_fields_and_from_config_refuses_unknown():
    assert T.Config(**{**TINY, "num_experts": 0, "moe_top_k": 9}).moe is None
    assert T.from_config({"family": "transformer", **TINY}).moe == moe.MoEConfig(
        num_experts=4, every=2, group_size=8, capacity_factor_train=1.0, capacity_factor_eval=1.0,
        expert_dropout=0.1, aux_loss_coef=0.1, z_loss_coef=0.01)
    with pytest.raises(ValueError, match="model.moe_topk is not a Transformer field"):
        T.from_config({"family": "transformer", "moe_topk": 2})


def test_train_config_errors_before_compiling():
    c = tiny_run_config(switch_stdlib)
    c.model.moe_group_size = 96  # 8 x 64 tokens per batch
    with pytest.raises(ValueError, match=r"model.moe_group_size \(96\) does not divide"):
        setup_training(c, pmesh.make_mesh(c.mesh))
    c.model.moe_dispatch = "dropless"
    config_lib.validate(c)  # no groups to fill without capacity
    c = tiny_run_config(switch_stdlib, num_experts=6)
    c.mesh.update(data=2, expert=-1)  # the expert axis is known only with the mesh: checked by train.setup
    config_lib.validate(c)
    with pytest.raises(ValueError, match=r"model.num_experts \(6\) is not divisible by the expert axis \(4\)"):
        setup_training(c, pmesh.make_mesh(c.mesh))
    c = tiny_run_config(switch_stdlib)
    c.mesh.update(data=2, expert=4)
    c.train.batch_size, c.model.moe_group_size = 8, 128  # 8 x 64 tokens = 4 groups of 128 for 8 devices
    config_lib.validate(c)
    with pytest.raises(ValueError,
                       match=r"holds 4 MoE routing groups, which the data x expert axes \(2 x 4 = 8\) cannot split"):
        setup_training(c, pmesh.make_mesh(c.mesh))
    for config in (switch_stdlib.get_config(), dense_stdlib.get_config(), bench_switch_350m.get_config()):
        config_lib.validate(config)


def test_hugging_face_conversion_refuses_moe_by_name():
    from models import hf

    cfg = T.Config(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, num_experts=4,
                   moe_group_size=8, dtype="float32")
    with pytest.raises(ValueError, match="model.num_experts"):
        hf.to_hf_state_dict(T.init(cfg, jax.random.PRNGKey(0)), cfg)
