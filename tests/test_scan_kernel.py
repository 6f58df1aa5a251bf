"""Pallas selective scan (models/scan_kernel.py), interpreted on CPU: outputs and gradients against the
sequential scan and a float64 NumPy loop (with and without resets, padded length, channels and state),
the Mamba model with scan='pallas', the Triton lowering for CUDA without a GPU, and the benchmark's --quick."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mamba as M, ssm_scan
from models import scan_kernel as K
from tests.helpers import h200, rel_err

pytestmark = pytest.mark.timeout(120)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})  # compile time dominates

# Small kernels: length 11 = 2 chunks of 4 + 3 (padded), E 24 -> 32 (blocks of 16 / 8), N 3 -> 4.
KW = dict(chunk=4, block_e=16, bwd_block_e=8, split_chunk=4)


def inputs(b, s, E, N, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    dt = np.log1p(np.exp(f(b, s, E) - 2.0))
    dt[:, rng.random(s) < 0.15] = 0.0  # padding-like steps
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return dict(x=cast(f(b, s, E)), dt=cast(dt), A=jnp.asarray(-np.exp(0.5 * f(E, N)) - 0.1), B=cast(f(b, s, N)),
                C=cast(f(b, s, N)), h0=jnp.asarray(f(b, E, N))), jnp.asarray(rng.random((b, s)) < 0.15)


@pytest.mark.parametrize("resets,prefetch", [(False, True), (True, False)])
def test_outputs_and_gradients_match_sequential_scan(resets, prefetch):
    b, s, E, N = 2, 11, 24, 3
    inp, reset = inputs(b, s, E, N, seed=int(resets))
    keep = 1.0 - reset.astype(jnp.float32) if resets else None
    w_y, w_h = (jnp.asarray(np.random.default_rng(5).standard_normal(sh), jnp.float32) for sh in ((b, s, E), (b, E, N)))

    def loss(args, scan):
        y, h = scan(args["x"], args["dt"], args["A"], args["B"], args["C"], keep, args["h0"])
        return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)

    pallas = lambda x, dt, A, B, C, keep, h0: K.selective_scan_pallas(  # noqa: E731
        x, dt, A, B, C, keep=keep, h0=h0, prefetch=prefetch, **KW)
    grad = lambda scan: jit(jax.grad(functools.partial(loss, scan=scan), has_aux=True))(inp)  # noqa: E731
    (g_ref, (y_ref, h_ref)), (g, (y, h)) = grad(ssm_scan._scan_reference), grad(pallas)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(h, h_ref) < 1e-6
    for name in inp:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name
    # The primal (no gradient) path, which saves no states, gives the same outputs.
    y2, h2 = jit(pallas)(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], keep, inp["h0"])
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(h2, h)


def test_bf16_inputs_match_float64_numpy():
    """bf16 x, dt, B, C are read as is and computed in float32: equal to float64 on the rounded values."""
    b, s, E, N = 1, 7, 8, 2  # shorter than a chunk of 8 (the default)
    inp, reset = inputs(b, s, E, N, seed=3, dtype=jnp.bfloat16)
    y, h = M.selective_scan(**inp, D=jnp.full((E,), 0.5), reset=reset, method="pallas")
    x, dt, A, B, C, h64 = (np.asarray(inp[k], np.float64) for k in ("x", "dt", "A", "B", "C", "h0"))
    ys = []
    for t in range(s):
        decay = np.exp(dt[:, t, :, None] * A) * (1.0 - np.asarray(reset[:, t], np.float64))[:, None, None]
        h64 = decay * h64 + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h64, C[:, t]) + 0.5 * x[:, t])
    assert y.dtype == h.dtype == jnp.float32
    np.testing.assert_allclose(y, np.stack(ys, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, h64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat,unroll", [("full", 1), ("dots_scan", 0)])
def test_mamba_pallas_equals_chunked_logits_and_gradients(remat, unroll):
    """The Pallas scan in the model equals the chunked scan (remat "full", layers in a loop), also with the
    scan's residuals kept ("dots_scan") and the layers unrolled."""
    cfg = M.Config(vocab_size=61, d_model=16, n_layers=2, d_state=4, dtype="float32", chunk_size=4)
    params = jit(M.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 9)), jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 5, [1] * 6 + [0] * 3], jnp.int32)  # packed; right-padded

    def loss(p, cfg):
        logits = M.apply(p, tokens, cfg, segment_ids=seg)[0]
        return jnp.mean(logits ** 2), logits

    grad = jit(jax.grad(loss, has_aux=True), static_argnums=1)
    pallas = dataclasses.replace(cfg, scan="pallas", remat=remat, layer_unroll=unroll)
    (g, logits), (g_ref, logits_ref) = grad(params, pallas), grad(params, cfg)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-5


def test_triton_lowering_for_cuda_without_a_gpu():
    """Forward and backward lower to Triton calls for an H200 (catches unsupported ops and block shapes)."""
    b, s, E, N = 2, 41, 128, 16  # 41: padded to 48, chunks of 8
    sd = jax.ShapeDtypeStruct
    args = (sd((b, s, E), jnp.bfloat16), sd((b, s, E), jnp.float32), sd((E, N), jnp.float32),
            sd((b, s, N), jnp.bfloat16), sd((b, s, N), jnp.bfloat16), sd((b, s), jnp.float32), sd((b, E, N), jnp.float32))

    def fwd(x, dt, A, B, C, keep, h0, with_keep):
        return K.selective_scan_pallas(x, dt, A, B, C, keep=keep if with_keep else None, h0=h0, interpret=False,
                                       prefetch=not with_keep)

    def grad(*args, with_keep):
        loss = lambda *diff: sum(jnp.sum(o) for o in fwd(*diff, *args[5:], with_keep=with_keep))  # noqa: E731
        return jax.grad(loss, argnums=range(5))(*args[:5])

    with h200():
        for with_keep in (False, True):  # without resets: with prefetch
            for f, calls in ((fwd, 1), (grad, 2)):  # grad: the forward that saves states, and the backward
                lowered = jax.jit(functools.partial(f, with_keep=with_keep)).trace(*args).lower(
                    lowering_platforms=("cuda",))
                assert lowered.as_text().count("__gpu$xla.gpu.triton") == calls


def test_benchmark_quick_runs(capsys):
    from experiments import bench_mamba_scan
    errs = bench_mamba_scan.main(["--quick", "--skip-reference", "--runs", "1"])
    assert errs["y"] < 1e-5 and errs["h_last"] < 1e-5 and errs["dA"] < 1e-3
    assert "pallas" in capsys.readouterr().out


def test_config_accepts_pallas():
    assert M.Config(scan="pallas").scan == "pallas"  # refusals: tests/test_mamba.py
    assert M.Config(scan="pallas", scan_splits=4).scan_splits == 4
    with pytest.raises(ValueError, match="model.scan_splits is -1"):
        M.Config(scan_splits=-1)
    x, A, B = jnp.zeros((1, 8, 8)), jnp.zeros((8, 4)), jnp.zeros((1, 8, 4))
    with pytest.raises(ValueError, match="seq_splits is 0; use a positive integer"):
        K.selective_scan_pallas(x, x, A, B, B, seq_splits=0)
    for name, value in (("split_chunk", 0), ("num_warps", 0), ("block_e", -64), ("bwd_block_e", 16.0),
                        ("split_num_warps", True)):
        with pytest.raises(ValueError, match=f"{name} is {value!r}; use a positive integer"):
            K.selective_scan_pallas(x, x, A, B, B, seq_splits=2, **{name: value})


def test_mamba_scan_splits_reach_the_kernel():
    """model.scan_splits = 3: two forward kernels per layer (0, auto, is 1 off a GPU); logits equal the
    chunked scan's."""
    cfg = M.Config(vocab_size=61, d_model=16, n_layers=2, d_state=4, dtype="float32", chunk_size=4)
    params = jit(M.init, static_argnums=0)(cfg, jax.random.PRNGKey(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 61, (1, 40)), jnp.int32)
    seg = jnp.asarray([[1] * 20 + [2] * 20], jnp.int32)  # pieces of 16 (chunks of 8, to 48): 20 is in the second
    apply = lambda p, cfg: M.apply(p, tokens, cfg, segment_ids=seg)[0]  # noqa: E731
    for splits, kernels in ((0, 1), (3, 2)):
        jaxpr = str(jax.make_jaxpr(functools.partial(apply, cfg=dataclasses.replace(cfg, scan="pallas",
                                                                                     scan_splits=splits)))(params))
        assert jaxpr.count("name=selective_scan_fwd") == kernels
    want = jit(apply, static_argnums=1)(params, cfg)
    got = jit(apply, static_argnums=1)(params, dataclasses.replace(cfg, scan="pallas", scan_splits=3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pallas_under_a_mesh_runs_per_device_and_equals_one_device():
    """With a mesh active the kernels run in shard_map over rows (data) and channels (tensor), since
    XLA cannot partition their custom calls; logits and gradients equal the unsharded chunked scan."""
    from parallel import mesh as pmesh, sharding
    from train.config import DEFAULT_RULES

    cfg = M.Config(vocab_size=61, d_model=16, n_layers=2, d_state=4, dtype="float32", chunk_size=4)
    params = jit(M.init, static_argnums=0)(cfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 61, (4, 9)), jnp.int32)
    seg = jnp.asarray([[1] * 9, [1] * 4 + [2] * 5, [0] * 2 + [1] * 7, [1] * 6 + [0] * 3], jnp.int32)

    def loss(p, cfg):
        logits = M.apply(p, tokens, cfg, segment_ids=seg)[0]
        return jnp.mean(logits ** 2), logits

    grad = jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_ref, logits_ref = grad(params, cfg)
    pallas = dataclasses.replace(cfg, scan="pallas")
    mesh = pmesh.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with sharding.activate(mesh, DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(lambda p: loss(p, pallas))(params))
        g, logits = grad(params, pallas)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-5
    # The other optional inputs: no resets, a given initial state.
    inp, _ = inputs(4, 11, 24, 3, seed=2)
    def scan(inp):
        return M.selective_scan(**inp, D=jnp.ones((24,)), method="pallas")

    want = jit(scan)(inp)
    with sharding.activate(mesh, DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(scan)(inp))  # traced again: the mesh is in jit's cache key
        got = jit(scan)(inp)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


# Sequence split: length 70 in P = 3 pieces of 24 (padded to 72) or P = 4 pieces of 20 (padded to 80),
# chunks of 4. dt is scaled down so that a piece's state and adjoint still matter pieces later.
SPLIT_RESETS = (0, 11, 24, 40, 47, 59)  # 24 and 40 start a piece (P = 3 and 4); 47 and 59 end one (P = 3 and 4)


@pytest.fixture(scope="module")
def split_case():
    b, s, E, N = 2, 70, 16, 4
    inp, _ = inputs(b, s, E, N, seed=7)
    inp["dt"] = 0.2 * inp["dt"]
    reset = np.zeros((b, s), bool)
    reset[0, list(SPLIT_RESETS)] = True  # row 1: no resets, the state runs through every piece
    rng = np.random.default_rng(8)
    w_y, w_h = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((b, s, E), (b, E, N)))

    def grad(scan, keep):
        def loss(args):
            y, h = scan(args["x"], args["dt"], args["A"], args["B"], args["C"], keep, args["h0"])
            return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)
        return jit(jax.grad(loss, has_aux=True))(inp)

    keeps = {False: None, True: 1.0 - jnp.asarray(reset, jnp.float32)}
    return inp, keeps, grad, {r: grad(ssm_scan._scan_reference, keeps[r]) for r in (False, True)}


@pytest.mark.parametrize("resets,splits,tiles", [(False, 3, {}), (True, 3, {}), (True, 4, {}),
                                                 (True, 3, dict(split_chunk=8, split_block_e=8, split_prefetch=False))])
def test_sequence_split_matches_sequential_scan(split_case, resets, splits, tiles):
    """Pieces scanned from zero, combined across pieces and rescanned (forward), the adjoint likewise
    (backward): y, h_last and the gradients of x, dt, A, B, C, h0 equal the sequential scan, resets
    inside pieces, on a piece's first step and on its last included; also with the extra passes (pass 1, the
    adjoint) in chunks and channel blocks of their own."""
    inp, keeps, grad, refs = split_case
    keep = keeps[resets]
    pallas = lambda x, dt, A, B, C, keep, h0: K.selective_scan_pallas(  # noqa: E731
        x, dt, A, B, C, keep=keep, h0=h0, seq_splits=splits, **{**KW, **tiles})
    (g_ref, (y_ref, h_ref)), (g, (y, h)) = refs[resets], grad(pallas, keep)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(h, h_ref) < 1e-6
    for name in inp:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name
    if splits == 4:  # the primal path (no states saved) gives the same outputs
        y2, h2 = jit(pallas)(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], keep, inp["h0"])
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(h2, h)


def test_bfloat16_y_is_the_float32_y_rounded_and_its_gradient_is_read_as_given(split_case):
    """y_dtype=bfloat16 (the bf16 Mamba's): y is the float32 kernel's y rounded, and the gradients are the
    float32 kernel's for the same (bf16) cotangent, split scan included."""
    inp, keeps, _, _ = split_case
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    w_y = jnp.asarray(np.random.default_rng(4).standard_normal(inp["x"].shape), jnp.bfloat16)

    def grad(y_dtype):
        def loss(args):
            y, h = K.selective_scan_pallas(*args, keep=keeps[True], h0=inp["h0"], seq_splits=3, y_dtype=y_dtype, **KW)
            assert y.dtype == y_dtype
            return jnp.sum(y * w_y.astype(y_dtype)).astype(jnp.float32) + jnp.sum(h), y
        return jit(jax.grad(loss, has_aux=True))(args)

    (g16, y16), (g32, y32) = grad(jnp.bfloat16), grad(jnp.float32)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))
    for a, b, name in zip(g16, g32, "x dt A B C".split()):
        assert rel_err(a, b) < 1e-6, name


@pytest.mark.parametrize("policy", ["dots", "dots_scan"])
def test_remat_policies_keep_the_scan_states_they_name(split_case, policy, capsys):
    """Under "dots" the split scan's states before each piece are kept (so the backward's recomputation
    skips pass 1, whose only product they are); under "dots_scan" also the scan's output and chunk-start
    states (the backward then runs no forward scan). The gradients are those without remat."""
    from models import layers
    inp, keeps, grad, _ = split_case

    def pallas(x, dt, A, B, C, keep, h0):
        return K.selective_scan_pallas(x, dt, A, B, C, keep=keep, h0=h0, seq_splits=3, **KW)

    remat = jax.checkpoint(pallas, policy=layers.REMAT_POLICIES[policy])
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")] + [keeps[True], inp["h0"]]
    jax.ad_checkpoint.print_saved_residuals(lambda *a: jnp.sum(remat(*a)[0]), *args)
    saved = capsys.readouterr().out
    assert f"f32[2,3,16,4] named '{K.PIECE_STATES}'" in saved
    chunk_states = f"f32[2,{72 // KW['chunk']},16,4] named '{K.RESIDUALS}'"  # 70 steps padded to 3 pieces of chunks
    assert (chunk_states in saved) == (policy == "dots_scan"), saved
    (g, _), (g_remat, _) = grad(pallas, keeps[True]), grad(remat, keeps[True])
    for name in inp:
        assert rel_err(g_remat[name], g[name]) < 1e-6, name


def test_sequence_split_lowers_to_triton():
    """Split in 4: the forward is two kernel calls (pieces from zero, then from their true states); the
    gradient adds the adjoint-only kernel and the backward (4 calls), each taking exp2 as one PTX instruction.
    The choice: split only while the rows and channel blocks leave the GPU's SMs short of programs, into pieces
    of at least 1024 steps."""
    b, s, E, N = 1, 64, 128, 16
    sd = jax.ShapeDtypeStruct
    args = (sd((b, s, E), jnp.bfloat16), sd((b, s, E), jnp.float32), sd((E, N), jnp.float32),
            sd((b, s, N), jnp.bfloat16), sd((b, s, N), jnp.bfloat16), sd((b, s), jnp.float32))

    def fwd(x, dt, A, B, C, keep):
        return K.selective_scan_pallas(x, dt, A, B, C, keep=keep, interpret=False, seq_splits=4)

    def grad(*args):
        return jax.grad(lambda *d: sum(jnp.sum(o) for o in fwd(*d, args[5])), argnums=range(5))(*args[:5])

    with h200():
        for f, calls in ((fwd, 2), (grad, 4)):
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("__gpu$xla.gpu.triton") == calls
            # exp(dt A): the one-instruction exp2 in each kernel, not libdevice's
            assert text.count("ex2.approx.ftz.f32") >= calls and "__nv_exp2f" not in text
    assert K.auto_splits(1, 32768, 2048, 64, 132) == 16  # 32 programs -> 512; pieces of 2048
    assert K.auto_splits(4, 8192, 2048, 64, 132) == 4
    assert K.auto_splits(16, 2048, 2048, 64, 132) == K.auto_splits(1, 1500, 2048, 64, 132) == 1


def test_benchmark_split_table_quick_runs(capsys):
    from experiments import bench_mamba_scan
    errs = bench_mamba_scan.main(["--quick", "--splits", "2", "--runs", "1"])  # correctness: the tests above
    assert list(errs) == [("1x40x32x4", 2)] and errs[("1x40x32x4", 2)] is not None  # not an error row
    assert "f+b/P1" in capsys.readouterr().out
