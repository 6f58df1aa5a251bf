"""Mamba decoding: the fused one-token step kernel (Pallas, interpreted on CPU) against the XLA step and a
float64 NumPy formula, and generation through the kernel against generation through XLA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import generate as G
from models import mamba as M
from models import mamba_ops
from models import dt_kernel as DK
from models import step_kernel as K
from models.flash_kernel import block_size
from parallel import mesh as pmesh
from parallel import sharding
from tests.helpers import h200, jit, rel_err
from tests.test_mamba import B, CFG, NEW, PROMPTS, RULES, cached, naive_greedy, params_for

pytestmark = pytest.mark.timeout(120)


def numpy_step(h, x, z, dbc, dt_proj, dt_bias, A, D, keep, live):
    """dt = live softplus(dt_low W_dt + dt_bias), h' = keep exp(dt A) h + dt B x, y = (C.h' + D x) silu(z); float64."""
    h, x, z, dbc, dt_proj, dt_bias, A, D, keep, live = (np.asarray(a, np.float64) for a in
                                                       (h, x, z, dbc, dt_proj, dt_bias, A, D, keep, live))
    R, N = dt_proj.shape[0], A.shape[1]
    dt_low, B, C = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
    dt = np.log1p(np.exp(dt_low @ dt_proj + dt_bias)) * live[:, None]
    h = keep[:, None, None] * np.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None, :]
    y = np.einsum("ben,bn->be", h, C) + D * x
    return y * z / (1 + np.exp(-z)), h


@pytest.mark.parametrize("E,N,R,block_e", [(64, 16, 32, 16), (24, 4, 3, 128)])  # dt_low, B, C read in place; sliced
def test_step_kernels_equal_xla_and_float64(E, N, R, block_e):
    L, b, layer = 3, 4, 1
    rng = np.random.default_rng(E)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    h, x, z, dbc, dt_proj, bias = f(L, b, E, N), f(b, E), f(b, E), f(b, R + 2 * N), f(R, E) / R, f(E)
    A, D = -jnp.exp(f(E, N)), f(E)
    keep, live = jnp.array([1.0, 0.0, 1.0, 1.0]), jnp.array([1.0, 1.0, 0.0, 1.0])  # a reset row, a padding row
    args = (x, z, dbc, dt_proj, bias, A, D, keep, live)
    y, h_all = jit(lambda h, args: K.selective_step(h, layer, *args, block_b=2, block_e=block_e, interpret=True),
                   donate_argnums=0)(jnp.array(h), args)
    y_ref, h_ref = jit(K.step_reference)(h[layer], *args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_all[layer], h_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.delete(np.asarray(h_all), layer, 0), np.delete(np.asarray(h), layer, 0))
    y64, h64 = numpy_step(h[layer], *args)
    np.testing.assert_allclose(y_ref, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_ref, h64, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h_ref[2], h[layer, 2])  # padding: the state is unchanged
    assert block_size(E, block_e) == min(block_e, E & -E)
    if R % N == 0:  # under a mesh: shard_map over rows (data) and channels (tensor), the same numbers
        with sharding.activate(pmesh.make_mesh({"data": 2, "tensor": 4}), RULES):
            y_sh, h_sh = jit(lambda h, args: M._kernel_call(K.selective_step, "ssm", h, layer, *args),
                             donate_argnums=0)(jnp.array(h), args)
        np.testing.assert_allclose(y_sh, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(h_sh, h_all)
    # z read from the second half of a [b, 2E] array (in_xz's output): the same numbers.
    y_xz, _ = jit(lambda h, args: K.selective_step(h, layer, x, jnp.concatenate([x, z], 1), *args, block_b=2,
                                                   block_e=block_e, interpret=True))(h, args[2:])
    np.testing.assert_allclose(y_xz, y, rtol=1e-6, atol=1e-6)
    # The conv step (in place on a stacked window, x the first half of [x, z]) against mamba_ops.causal_conv, with a
    # reset row and a padding row (a zero input).
    window, w, conv_b = f(L, b, 3, E), f(4, E), (f(E) if R % N == 0 else None)
    xc, window_all = jit(lambda win, xz: K.conv_step(win, layer, xz, w, conv_b, keep, live, block_b=2,
                                                     block_e=block_e, interpret=True),
                         donate_argnums=0)(jnp.array(window), jnp.concatenate([x, z], 1))
    out, buffer = jit(mamba_ops.causal_conv)((x * live[:, None])[:, None], w, conv_b,
                                     run=(1 - keep).astype(jnp.int32)[:, None], buffer=window[layer])
    np.testing.assert_allclose(xc, jax.nn.silu(out[:, 0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(window_all[layer], buffer)
    np.testing.assert_array_equal(np.delete(np.asarray(window_all), layer, 0), np.delete(np.asarray(window), layer, 0))


def test_decode_params_and_generation_with_kernel_equal_xla():
    params = params_for(CFG)
    per_layer_params = jit(M.decode_params, static_argnums=1)(params, CFG)
    per_layer = per_layer_params["layers"]
    assert len(per_layer) == CFG.n_layers and set(per_layer[0]) >= {"in_xz", "A"}
    np.testing.assert_array_equal(per_layer[1]["in_xz"][:, CFG.d_inner:], params["layers"]["in_z"][1])
    xla, kernel = (dataclasses.replace(CFG, decode=d) for d in ("xla", "pallas"))
    assert not M.use_step_kernel(xla) and M.use_step_kernel(kernel) and not M.use_step_kernel(CFG)  # default xla; CPU auto = xla
    assert not M.use_step_kernel(dataclasses.replace(CFG, decode="auto"))

    # Cached steps (a padding token, a new segment mid-way): per-layer weights through the kernels equal the
    # stacked weights through the XLA scan (test_mamba's compiled ``cached``, [B, 1] steps).
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, 4)).astype(np.int32)
    seg = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [0, 0, 1, 3]], np.int32)
    outs = []
    for p, cfg in ((params, CFG), (per_layer_params, kernel)):
        cache, logits = M.init_cache(cfg, B), []
        for t in range(tokens.shape[1]):
            out, cache = cached(p, tokens[:, t:t + 1], cfg, cache, seg[:, t:t + 1])
            logits.append(out)
        outs.append((np.concatenate(logits, 1), cache))
    (want, want_cache), (got, got_cache) = outs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in ("conv", "ssm", "segment"):
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # Generation through the kernel: the tokens of greedy decoding by the full forward pass.
    assert G.greedy(M, params, kernel, PROMPTS, max_new_tokens=NEW) == naive_greedy(params, PROMPTS, NEW)


def test_state_in_bfloat16():
    """``state_dtype="bfloat16"``: the cache holds the state rounded to bf16 after each update (computed in float32).
    The step kernel's h' is the float32 reference's rounded once, its y the reference's; cached decoding (a prompt,
    then steps) through the kernels and through XLA agree, and stay within bf16 rounding of the float32 state's
    logits; another name is refused."""
    rng = np.random.default_rng(5)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    L, b, E, N, R, layer = 2, 4, 64, 16, 32, 1
    h = f(L, b, E, N).astype(jnp.bfloat16)
    args = (f(b, E), f(b, E), f(b, R + 2 * N), f(R, E) / R, f(E), -jnp.exp(f(E, N)), f(E))
    y, h_all = jit(lambda h, args: K.selective_step(h, layer, *args, block_b=2, block_e=16, interpret=True))(h, args)
    y_ref, h_ref = jit(K.step_reference)(h[layer], *args)
    assert h_all.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h_all[layer], np.float32),
                                  np.asarray(h_ref.astype(jnp.bfloat16), np.float32))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)

    params = params_for(CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (B, 7)).astype(np.int32)
    logits, prompt_state = {}, {}
    for state_dtype, decode in (("float32", "xla"), ("bfloat16", "xla"), ("bfloat16", "pallas")):
        cfg = dataclasses.replace(CFG, state_dtype=state_dtype, decode=decode)
        cache = M.init_cache(cfg, B)
        assert cache["ssm"].dtype == jnp.dtype(state_dtype)
        p = M.decode_params(params, cfg) if decode == "pallas" else params
        out, cache = cached(p, tokens[:, :4], cfg, cache, None)
        prompt_state[state_dtype, decode] = cache["ssm"]
        steps = [out[:, -1:]]
        for t in range(4, 7):
            out, cache = cached(p, tokens[:, t:t + 1], cfg, cache, None)
            steps.append(out)
        assert cache["ssm"].dtype == jnp.dtype(state_dtype)
        logits[state_dtype, decode] = np.concatenate(steps, 1)
    # the prompt's state: the float32 one rounded once
    np.testing.assert_array_equal(np.asarray(prompt_state["bfloat16", "xla"], np.float32),
                                  np.asarray(prompt_state["float32", "xla"].astype(jnp.bfloat16), np.float32))
    np.testing.assert_allclose(logits["bfloat16", "pallas"], logits["bfloat16", "xla"], rtol=1e-5, atol=1e-5)
    err = rel_err(logits["bfloat16", "xla"], logits["float32", "xla"])
    assert 1e-6 < err < 2e-4, err  # measured 2.5e-5: the tiny model's logits depend little on its state
    with pytest.raises(ValueError, match="model.state_dtype is 'int8'"):
        dataclasses.replace(CFG, state_dtype="int8")


def test_prefill_conv_equals_causal_conv():
    """The prompt's conv kernel against ``causal_conv`` and silu (cached window, a reset mid-block, left padding,
    x read from [x, z]); interpreted."""
    rng = np.random.default_rng(3)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    E = 48
    b, s, Kc = 3, 64, 4
    xz, w, bias, window = f(b, s, 2 * E), f(Kc, E), f(E), f(b, Kc - 1, E)
    seg = np.ones((b, s), np.int32)
    seg[0, :21] = 0  # left padding into the second block
    seg[1, 40:] = 2  # a new segment mid-block
    seg[2, 31:34] = [0, 3, 3]  # a padding token inside, then a new segment across a block boundary
    _, nonpad, run, _ = mamba_ops.segment_info(jnp.asarray(seg), jnp.array([1, 1, 1]))
    x = jnp.where(nonpad[..., None], xz[..., :E], 0)
    for conv_b, block_t in ((bias, 16), (None, 32)):
        want = mamba_ops.causal_conv(x, w, conv_b, run=run, buffer=window)[0]  # its window: test_mamba's float64 loop
        got = K.prefill_conv(xz, w, conv_b, run, nonpad, window, block_t=block_t, block_e=16, interpret=True)
        np.testing.assert_allclose(got, jax.nn.silu(want), rtol=1e-6, atol=1e-6)
    assert not K.prefill_conv_takes(40, E) and not K.prefill_conv_takes(s, 40)
    with pytest.raises(ValueError, match="multiples of 16"):
        K.prefill_conv(xz[:, :40], w, bias)


def test_prefill_through_the_kernels_equals_xla():
    """A prompt through a Mamba with dt_rank 16 takes the dt and conv kernels once a layer (decode "pallas",
    interpreted): its logits and cache equal XLA's, and greedy decoding gives XLA's tokens."""
    cfg = M.Config(vocab_size=61, d_model=32, n_layers=2, d_state=8, dt_rank=16, dtype="float32", chunk_size=8)
    params = params_for(cfg)
    kernel = dataclasses.replace(cfg, decode="pallas")
    tokens = np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 32)).astype(np.int32)
    seg = np.ones((2, 32), np.int32)
    seg[0, :5] = 0  # left padding
    seg[1, 20:] = 2  # a second segment
    prefill = lambda p, c: cached(p, tokens, c, M.init_cache(c, 2), seg)  # noqa: E731
    names = str(jax.make_jaxpr(lambda p: M.apply(p, tokens, kernel, segment_ids=seg, cache=M.init_cache(kernel, 2)))(
        M.decode_params(params, cfg)))
    assert names.count("name=mamba_dt") == names.count("name=mamba_prefill_conv") == cfg.n_layers
    want, want_cache = prefill(params, cfg)
    got, got_cache = prefill(M.decode_params(params, cfg), kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in ("conv", "ssm", "segment"):
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-5, atol=1e-6, err_msg=name)
    prompts = ((5, 17, 3, 9, 22, 41, 8, 1, 30, 2), (8, 1, 33), tuple(range(1, 17)))  # padded to 16 positions
    assert G.greedy(M, params, kernel, prompts, max_new_tokens=4) == G.greedy(M, params, cfg, prompts,
                                                                               max_new_tokens=4)


def test_prefill_kernels_lower_for_cuda_without_a_gpu():
    """The 370M config's dt kernels (forward, gradient) and prefill conv at a 64 x 2048 prompt, and its batch-64 step
    on a float32 and a bf16 state, lower to one Triton call each for an H200; dt's exp2 and log2 are the PTX
    instructions (``flash_kernel.exp2``), not libdevice's."""
    sd, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    dt_args = (sd((64, 2048, 96), bf16), sd((64, 2048), bf16), sd((2048,), jnp.float32), sd((64, 2048), jnp.bool_))
    calls = (  # (function, arguments): the gradient's program (the forward's output unused) is the gradient kernel
        (lambda d, w, b, l: DK.dt(d, w, b, l, interpret=False), dt_args),
        (lambda d, w, b, l: jax.vjp(lambda d: DK.dt(d, w, b, l, interpret=False), d)[1](
            jnp.ones((64, 2048, 2048), bf16)), dt_args),
        (lambda x, w, b, r, l, win: K.prefill_conv(x, w, b, r, l, win, interpret=False),
         (sd((64, 2048, 4096), bf16), sd((4, 2048), bf16), sd((2048,), bf16), sd((64, 2048), jnp.int32),
          sd((64, 2048), jnp.bool_), sd((64, 3, 2048), bf16))))
    for h_dtype in (jnp.float32, bf16):  # the one-token step on either state, its default tiles (STATE_TILES)
        calls += ((lambda h, *a: K.selective_step(h, 3, *a, interpret=False),
                   (sd((48, 64, 2048, 16), h_dtype), sd((64, 2048), bf16), sd((64, 4096), bf16), sd((64, 96), bf16),
                    sd((64, 2048), bf16), sd((2048,), jnp.float32), sd((2048, 16), jnp.float32),
                    sd((2048,), jnp.float32))),)
    for i, (fn, args) in enumerate(calls):
        with h200():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        if i < 2:  # dt: softplus (exp2, log2) forward, sigmoid (exp2) in the gradient
            assert "ex2.approx.ftz.f32" in text and "__nv_exp2f" not in text
            assert ("lg2.approx.f32" in text) == (i == 0) and "__nv_log2f" not in text
