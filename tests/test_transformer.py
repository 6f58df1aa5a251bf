"""Transformer LM: shapes, masking, RoPE, GQA, packing, caching, remat, and Hugging Face parity."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import capture, layers
from models import transformer as T
from tests.helpers import random_params, rel_err

pytestmark = pytest.mark.timeout(120)

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32")


def tiny(**kw):
    return T.Config(**{**TINY, **kw})


def tokens(cfg, b=2, s=12, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, s), 0, cfg.vocab_size)


def apply_with_hidden(params, toks, cfg):
    """(logits, every layer's input and the last output [n_layers + 1, b, s, d]) via ``models.capture``."""
    with capture.taps(hidden=True) as got:
        logits, _ = T.apply(params, toks, cfg)
    return logits, capture.stack_hidden(got.hidden)


def test_shapes_and_dtypes():
    cfg = T.Config(**{**TINY, "dtype": "bfloat16"})
    params = T.init(cfg, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_structs(
        jax.tree.map(lambda _: 0, params),
        jax.tree.map(lambda _: 0, T.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    for leaf, axes in zip(jax.tree.leaves(params),
                          jax.tree.leaves(T.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))):
        assert leaf.dtype == jnp.float32 and leaf.ndim == len(axes)
    assert params["layers"]["wq"].shape == (2, 32, 32) and params["layers"]["wk"].shape == (2, 32, 16)
    logits, hidden = jax.jit(lambda p, t: apply_with_hidden(p, t, cfg))(params, tokens(cfg))
    chex.assert_shape(logits, (2, 12, 61))
    assert logits.dtype == jnp.float32
    chex.assert_shape(hidden, (3, 2, 12, 32))
    assert hidden.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(logits)


def test_embed_blocks_head_compose_and_block_runs_one_layer():
    cfg = tiny()
    params, toks = random_params(cfg), tokens(cfg)
    logits, hidden = apply_with_hidden(params, toks, cfg)
    x = T.embed(params, toks, cfg)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    for i in range(cfg.n_layers):
        chex.assert_trees_all_close(x, hidden[i], atol=1e-6)
        x, _, _ = T.block(jax.tree.map(lambda a: a[i], params["layers"]), x, cfg, positions=pos)
    chex.assert_trees_all_close(T.head(params, x, cfg), logits, atol=1e-5)


def test_causal_mask_future_tokens_change_no_earlier_logit():
    cfg = tiny()
    params, toks = random_params(cfg), tokens(cfg)
    changed = toks.at[:, 7].set((toks[:, 7] + 1) % cfg.vocab_size)
    a, _ = T.apply(params, toks, cfg)
    b, _ = T.apply(params, changed, cfg)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        rq = layers.rope(q, jnp.array([[m]]), 10000.0)
        rk = layers.rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(rq * rk))

    for m, n, shift in [(5, 2, 11), (0, 9, 3), (40, 40, 7)]:
        np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-5, atol=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # it does depend on the offset
    np.testing.assert_allclose(jnp.linalg.norm(layers.rope(q, jnp.array([[7]]), 1e4)), jnp.linalg.norm(q),
                               rtol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = tiny(n_heads=4, n_kv_heads=2)
    mha = tiny(n_heads=4, n_kv_heads=4)
    params = random_params(gqa)
    hd, group = gqa.head_dim, gqa.n_heads // gqa.n_kv_heads

    def repeat(w):  # [L, D, kv*hd] -> [L, D, heads*hd], each kv head used by `group` query heads
        L, D, _ = w.shape
        return jnp.repeat(w.reshape(L, D, gqa.n_kv_heads, hd), group, axis=2).reshape(L, D, -1)

    mha_params = jax.tree.map(lambda x: x, params)
    mha_params["layers"]["wk"] = repeat(params["layers"]["wk"])
    mha_params["layers"]["wv"] = repeat(params["layers"]["wv"])
    toks = tokens(gqa)
    a, _ = T.apply(params, toks, gqa)
    b, _ = T.apply(mha_params, toks, mha)
    assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_segments_equal_separate_sequences(impl):
    cfg = tiny(attention=impl)
    params = random_params(cfg)
    a, b = tokens(cfg, 1, 5, seed=2), tokens(cfg, 1, 7, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out, _ = T.apply(params, packed, cfg, positions=pos, segment_ids=seg)
    ref_a, _ = T.apply(params, a, cfg)
    ref_b, _ = T.apply(params, b, cfg)
    assert rel_err(out[:, :5], ref_a) < 1e-6
    assert rel_err(out[:, 5:], ref_b) < 1e-6


def test_attention_implementations_agree():
    cfg_ref, cfg_xla = tiny(attention="reference"), tiny(attention="xla")
    params, toks = random_params(cfg_ref), tokens(cfg_ref)
    assert rel_err(T.apply(params, toks, cfg_xla)[0], T.apply(params, toks, cfg_ref)[0]) < 1e-6


def test_auto_attention_takes_cudnn_only_where_cudnn_accepts_the_input():
    """cuDNN on GPU for bf16 training/prefill; XLA on CPU, for float32, cached decoding, and a segment
    mask over an odd length (cuDNN refuses a bias there in training: a 273-token synthetic row)."""
    from models.attention import auto_choice

    def choice(q_len, kv_len, dtype=jnp.bfloat16, on_gpu=True, **kw):
        q, k = jnp.zeros((1, q_len, 2, 8), dtype), jnp.zeros((1, kv_len, 2, 8), dtype)
        return auto_choice(q, k, on_gpu=on_gpu, **kw)

    seg = jnp.ones((1, 273), jnp.int32)
    assert choice(256, 256) == choice(273, 273) == choice(256, 256, q_segment_ids=seg[:, :256]) == "cudnn"
    assert choice(273, 273, q_segment_ids=seg) == "xla"
    assert choice(256, 256, on_gpu=False) == choice(256, 256, dtype=jnp.float32) == "xla"
    assert choice(1, 256, q_start=jnp.int32(7)) == choice(256, 256, q_start=jnp.int32(0)) == "xla"


@pytest.mark.parametrize("layout", ["stacked", "per_layer", "fused"])
def test_kv_cache_prefill_then_decode_equals_full_forward(layout):
    """Cached decoding equals the full forward with stacked weights and with the decoding layouts."""
    cfg = tiny()
    params, toks = random_params(cfg), tokens(cfg, s=10)
    full, _ = T.apply(params, toks, cfg)
    if layout != "stacked":
        params = T.decode_params(params, cfg, fuse=layout == "fused")
        assert isinstance(params["layers"], tuple) and len(params["layers"]) == cfg.n_layers
        assert ("wqkv" in params["layers"][0]) == (layout == "fused")
    cache = T.init_cache(cfg, 2, 16)
    out, aux = T.apply(params, toks[:, :6], cfg, cache=cache)
    steps = [out]
    for i in range(6, 10):
        out, aux = T.apply(params, toks[:, i:i + 1], cfg, cache=aux["cache"])
        steps.append(out)
    assert int(aux["cache"]["index"]) == 10
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_widened_projection_backward_multiplies_in_the_input_dtype():
    """linear with a wider out_dtype (the tied LM head: bf16 x and table, float32 logits) computes the
    float32-accumulated product; its backward rounds the float32 cotangent to bf16 first, so every matmul of
    the gradient reads bf16 operands (autodiff's own transpose would run two float32 GEMMs): against float64
    NumPy with the same roundings."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.bfloat16)
    table, g = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32), rng.normal(size=(2, 5, 32))
    head = lambda x, table: layers.linear(table, x, out_dtype=jnp.float32, transpose=True)  # noqa: E731
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    xr, tr, gr = f64(x), f64(table.astype(jnp.bfloat16)), f64(jnp.asarray(g, jnp.bfloat16))
    y, back = jax.vjp(head, x, table)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, xr @ tr.T, rtol=1e-5, atol=1e-5)
    dx, dtable = back(jnp.asarray(g, jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dtable.dtype == jnp.float32
    assert rel_err(dx, gr @ tr) < 4e-3 and rel_err(dtable, np.einsum("bsv,bsd->vd", gr, xr)) < 4e-3
    grad = jax.make_jaxpr(jax.grad(lambda x, t: jnp.sum(head(x, t) ** 2), (0, 1)))(x, table)
    dots = [e for e in grad.eqns if e.primitive.name == "dot_general"]  # the backward's (the forward's is inside
    assert len(dots) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)  # custom_vjp_call)


def test_one_row_projection_on_gpu_is_the_same_product(monkeypatch):
    """The GPU form of a one-row projection (a two-row GEMM behind optimisation barriers) computes
    x @ w, its gradients included, and batch-1 cached decoding through it equals the full forward."""
    monkeypatch.setattr(layers, "_on_gpu", lambda: True)
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((1, 1, 24), (24, 40)))
    jaxpr = str(jax.make_jaxpr(layers.linear)(w, x))
    assert "optimization_barrier" in jaxpr
    np.testing.assert_allclose(jax.jit(layers.linear)(w, x), np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                               rtol=1e-5, atol=1e-6)
    loss = lambda w, x: jnp.sum(jnp.sin(layers.linear(w, x)))  # noqa: E731
    plain = lambda w, x: jnp.sum(jnp.sin(x @ w))  # noqa: E731
    for got, want in zip(jax.grad(loss, (0, 1))(w, x), jax.grad(plain, (0, 1))(w, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    cfg = tiny()
    params, toks = random_params(cfg), tokens(cfg, b=1, s=8)
    full, _ = T.apply(params, toks, cfg)
    per_layer = T.decode_params(params, cfg)
    apply = jax.jit(lambda p, t, cache: T.apply(p, t, cfg, cache=cache))  # traced with the patch in place
    out, aux = apply(per_layer, toks[:, :5], T.init_cache(cfg, 1, 8))
    steps = [out]
    for i in range(5, 8):
        out, aux = apply(per_layer, toks[:, i:i + 1], aux["cache"])
        steps.append(out)
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("policy,unroll", [("none", 1), ("dots", 1), ("save_qkv_mlp", 1), ("dots", 0), ("none", 2)])
def test_remat_policies_and_unrolled_layers_give_same_gradients(policy, unroll):
    """Every remat policy, the layer scan unrolled (0: straight-line code, no loop; the recomputation keeps
    its CSE barrier) or 2 layers an iteration: the gradients of remat "full" in a loop."""
    base, other = tiny(remat="full"), tiny(remat=policy, layer_unroll=unroll)
    params, toks = random_params(base), tokens(base)

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(T.apply(p, toks, cfg)[0])[..., 0])

    chex.assert_trees_all_close(jax.grad(loss)(params, base), jax.grad(loss)(params, other), rtol=1e-5, atol=1e-7)
    if unroll == 0:
        grad = jax.jit(jax.grad(loss), static_argnums=1)
        assert "stablehlo.while" not in grad.lower(params, other).as_text()
        assert "stablehlo.while" in grad.lower(params, base).as_text()
        text = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, other))
        assert "prevent_cse=True" in text and "prevent_cse=False" not in text


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = tiny(n_kv_heads=4, d_model=32, d_ff=48, vocab_size=61)
    per_layer = 4 * 32 * 32 + 3 * 32 * 48
    assert T.matmul_params(cfg) == 2 * per_layer + 32 * 61
    assert T.flops_per_token(cfg, 100) == 6 * T.matmul_params(cfg) + 6 * 2 * 4 * 8 * 100


@pytest.mark.parametrize("field,value,words", [
    ("n_heads", 3, "multiple of model.n_kv_heads"),
    ("d_model", 0, "model.d_model"),
    ("attention", "flash", "model.attention"),
    ("remat", "some", "model.remat"),
    ("layer_unroll", -1, "model.layer_unroll is -1"),
    ("decode", "fused", r"model.decode is 'fused'; use one of \['auto', 'pallas', 'xla'\]"),
])
def test_invalid_config_names_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        T.Config(**{**TINY, field: value})


def test_from_config_refuses_unknown_field():
    with pytest.raises(ValueError, match="model.d_modle"):
        T.from_config({"family": "transformer", "d_modle": 3})


# ----------------------------------------------------------------------------- Hugging Face parity

def hf_logits(params, cfg, toks, rope_theta=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import hf

    conf = hf.llama_config(cfg)
    if rope_theta is not None:
        conf["rope_theta"] = rope_theta
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf)).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf.to_hf_state_dict(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and all("rotary" in k or k in allowed for k in missing), (missing, unexpected)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(toks, np.int64))).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hugging_face_llama(tie):
    cfg = tiny(rope_theta=500.0, tie_embeddings=tie, n_layers=3, attention="reference")
    params, toks = random_params(cfg, seed=4), tokens(cfg, b=2, s=24, seed=5)
    ours = np.asarray(T.apply(params, toks, cfg)[0])
    theirs = hf_logits(params, cfg, toks)
    assert np.std(theirs) > 0.5  # non-degenerate logits: attention is far from uniform
    assert rel_err(ours, theirs) <= 1e-5
    # Negative control: the same comparison with a wrong rope theta must fail.
    assert rel_err(ours, hf_logits(params, cfg, toks, rope_theta=10000.0)) > 1e-3


def test_hf_state_dict_round_trip():
    from models import hf

    cfg = tiny()
    params = random_params(cfg)
    back = hf.from_hf_state_dict(hf.to_hf_state_dict(params, cfg), cfg)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), back)
