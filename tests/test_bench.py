"""train.bench at tiny sizes on one CPU device: the split step timings, the decode bench for both
families (cache bytes from the cache each builds), and the long-sequence benchmark configs validate;
the benchmark scripts' argument errors, the exposed-communication measure, the scale-out tables and the decoding
floor's chains."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import bench_llama_350m, bench_mamba_370m, bench_switch_350m
from parallel import mesh as mesh_lib
from train import bench
from train import step as step_lib
from train.config import base_config
from train.setup import setup_training

# One layer, no remat: the fewest ops to compile (the bench configs' remat is "dots").
TINY = ("model.vocab_size=300,model.d_model=32,model.n_layers=1,model.n_heads=2,model.n_kv_heads=2,model.d_ff=64,"
        "model.remat=none,train.batch_size=4,train.seq_len=16")
TINY_MAMBA = dict(family="mamba", vocab_size=300, d_model=32, n_layers=1, d_state=4, expand=2, chunk_size=8,
                  remat="none")
# Equal tokens per step (32768) at sequence 2k, 8k, 32k: the variants of bench_mamba_370m's docstring.
LENGTHS = ("train.batch_size=16,train.seq_len=2048", "train.batch_size=4,train.seq_len=8192",
           "train.batch_size=1,train.seq_len=32768")


def one_device(config):
    return mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])


@pytest.mark.parametrize("name,make,extra", [
    ("dense", bench_llama_350m.get_config, ""),
    ("switch", bench_switch_350m.get_config, ",model.moe_every=1,model.moe_group_size=16"),  # one MoE layer
])
def test_bench_reports_step_gradients_and_optimizer(name, make, extra):
    config = bench.apply_overrides(make(), TINY + extra)
    row = bench.bench(config, steps=2, warmup=1, mesh=one_device(config))
    for key in ("step_s", "fwd_bwd_s", "optimizer_s", "tokens_per_s", "compile_s", "split_compile_s"):
        assert row[key] > 0, (name, key)
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    # The compiled step holds at least the train state it reads (float32 params and two AdamW moments).
    setup = setup_training(config, one_device(config))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state_shape))
    assert state_bytes <= row["planned_mem_gb"] * 1e9 < 20 * state_bytes, (name, row["planned_mem_gb"], state_bytes)


def _decode_row(config, batch=2, prompt_len=8, new_tokens=4):
    row = bench.bench_decode(config, batch, prompt_len, new_tokens, reps=1, mesh=one_device(config))
    for key in ("tokens_per_s", "decode_tokens_per_s", "decode_step_ms", "prefill_s", "total_s", "hbm_bytes_per_s"):
        assert math.isfinite(row[key]), key
    assert row["batch"] == batch and row["first_call_s"] > 0
    return row


def test_decode_transformer_counts_kv_cache_and_segment_ids():
    config = bench.apply_overrides(bench_llama_350m.get_config(), TINY)
    row = _decode_row(config)
    layers, batch, max_len, kv_heads, head_dim = 1, 2, 8 + 4, 2, 16
    # k and v in the compute dtype (bf16, 2 bytes), int32 segment ids per slot, the int32 write index.
    assert row["cache_bytes"] == 2 * 2 * layers * batch * max_len * kv_heads * head_dim + 4 * batch * max_len + 4
    assert row["weight_bytes"] == 2 * (32 * 4 * 32 + 3 * 32 * 64 + 32 * 300)  # q, k, v, o; the MLP; the head


def test_decode_mamba_counts_its_constant_state():
    config = base_config()
    config.model = ml_collections.ConfigDict(TINY_MAMBA)
    row = _decode_row(config)
    layers, batch, inner, conv, state = 1, 2, 64, 4, 4
    # conv buffers [layers, batch, d_conv - 1, inner] bf16, SSM state float32, int32 segment per row and index.
    expected = 2 * layers * batch * (conv - 1) * inner + 4 * layers * batch * inner * state + 4 * batch + 4
    assert row["cache_bytes"] == expected
    setup = setup_training(config, one_device(config))
    assert bench.cache_nbytes(setup.model, setup.mcfg, batch, 100_000) == expected  # whatever the length


@pytest.mark.parametrize("make", [bench_mamba_370m.get_config, bench_llama_350m.get_config])
@pytest.mark.parametrize("spec", LENGTHS)
def test_long_sequence_configs_validate(make, spec):
    config = bench.apply_overrides(make(), spec)
    setup = setup_training(config, one_device(config))  # shapes only: nothing compiled or allocated
    assert setup.abstract_batch()["inputs"].shape == (config.train.batch_size, config.train.seq_len)


def test_mamba_370m_matches_its_peer():
    mamba, peer = bench_mamba_370m.get_config(), bench_llama_350m.get_config()
    assert mamba.optim.to_dict() == peer.optim.to_dict() and mamba.train.to_dict() == peer.train.to_dict()
    for field in ("vocab_size", "d_model", "dtype", "param_dtype"):
        assert mamba.model[field] == peer.model[field], field
    # no remat, as the official implementation (its training peer) trains; the layers unrolled
    assert (mamba.model.remat, mamba.model.layer_unroll, peer.model.remat) == ("none", 0, "dots")
    setup = setup_training(mamba, one_device(mamba))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.state_shape.params))
    assert n == 352_797_696  # the figure in bench_mamba_370m's docstring


def test_official_mamba_peer_times_the_same_model_and_refuses_bad_arguments(tmp_path, capsys, monkeypatch):
    """experiments/peers/mamba_official.py (run on a GPU; here: its model and its argument checks)."""
    from experiments.peers import mamba_official as peer
    model = bench_mamba_370m.get_config().model
    assert peer.MODEL == dict(d_model=model.d_model, n_layer=model.n_layers, vocab_size=model.vocab_size)
    assert peer.parse_shapes("16x2048,4x8192") == [(16, 2048), (4, 8192)]
    (tmp_path / "mamba" / "csrc" / "selective_scan").mkdir(parents=True)
    (tmp_path / "mamba" / "mamba_ssm").mkdir()
    for argv, says in ((["--shapes", "16x"], "--shapes is '16x'"), (["--shapes", "0x8"], "--shapes is '0x8'"),
                       ([], "has no causal-conv1d/csrc/"), (["--steps", "0"], "--steps 0")):
        assert peer.main(["--src", str(tmp_path), "--out", str(tmp_path / "o.json"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    # A failed build (on a GPU machine) is one sentence too, and writes no results.
    import torch
    (tmp_path / "causal-conv1d" / "csrc").mkdir(parents=True)
    (tmp_path / "causal-conv1d" / "causal_conv1d").mkdir()

    def fail(paths, build_dir):
        raise RuntimeError("Error building extension 'selective_scan_cuda'\nninja: build stopped")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(peer, "import_official", fail)
    assert peer.main(["--src", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Error building extension 'selective_scan_cuda'" in err, err
    assert not (tmp_path / "o.json").exists()


def test_split_programs_compose_to_the_train_step():
    """fwd_bwd's gradients, divided by the batch's tokens as the step does, then the optimizer program,
    give the train step's new state: the two timed halves are the step's own computation."""
    import numpy as np

    from parallel import sharding

    config = bench.apply_overrides(bench_llama_350m.get_config(), TINY)
    setup = setup_training(config, one_device(config))
    t = config.train
    toks = np.random.default_rng(0).integers(0, 300, (t.batch_size, t.seq_len + 1), dtype=np.int32)
    batch = sharding.global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                                   "loss_mask": np.ones((t.batch_size, t.seq_len), np.int32)}, setup.mesh, setup.rules)
    with sharding.activate(setup.mesh, setup.rules):
        init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
        want, _ = jax.jit(setup.train_step)(init(jax.random.PRNGKey(0)), batch)
        fwd_bwd, optimizer = bench.split_programs(setup)
        state = init(jax.random.PRNGKey(0))  # a fresh copy: the optimizer program donates it
        _, grads = fwd_bwd(state.params, batch, step_lib.step_rng(config.seed, 0))
        got = optimizer(state, jax.tree.map(lambda g: g / (t.batch_size * t.seq_len), grads))
    assert int(got.step) == int(want.step) == 1
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


def test_exposed_communication_is_what_no_compute_covers():
    """Communication kernels (c*) against compute (k*), overlapping ones included: [0, 10) is covered by [2, 4)
    and [3, 6) (4 ns) and [9, 12) (1 ns); [20, 25) by nothing; [30, 31) entirely, by [29, 40)."""
    events = [("c1", 0, 10), ("k1", 2, 2), ("k2", 3, 3), ("k3", 9, 3), ("c2", 20, 5), ("c3", 22, 1),
              ("k4", 29, 11), ("c4", 30, 1)]
    assert bench.exposed_ns(events, lambda n: n.startswith("c")) == 5 + 5 + 0
    assert bench.exposed_ns(events, lambda n: False) == 0
    assert bench.exposed_ns([("c", 0, 7)], lambda n: True) == 7


@pytest.mark.parametrize("text,match", [
    ("bad", r"entry 'bad' is not NAME:section.key=value"),
    ("a:;a:", r"names 'a' twice"),
    ("x:foo", r"--variants 'x': override 'foo' is not section.key=value"),
    ("x:train.seq_len=64;y:model.d_modle=8", r"--variants 'y': .*no field model.d_modle; did you mean model.d_model\?"),
    ("x:modle.d_model=8", r"no field modle.d_model; did you mean model.d_model\?"),
    ("x:train.seq_len=abc", r"--variants 'x': .*seq_len"),
])
def test_bad_variants_fail_before_any_runs(text, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_variants(text, bench_llama_350m.get_config())


def test_variants_parse_names_and_overrides():
    config = bench_llama_350m.get_config()
    assert bench.parse_variants("", config) == [("config", "")]
    assert bench.parse_variants("a:; b:train.seq_len=64,model.remat=none", config) == [
        ("a", ""), ("b", "train.seq_len=64,model.remat=none")]


@pytest.mark.parametrize("args,match", [
    (["kernel", "--shapes", "4x"], "--shapes '4x' is not a comma-separated list of AxB groups"),
    (["seqlen", "--contexts", "0"], "--contexts '0' is not a comma-separated list of positive integers"),
    (["kernel", "--blocks", "64,x"], "--blocks '64,x' is not"),
])
def test_bench_ring_refuses_bad_lists_in_one_line(args, match, capsys):
    from experiments import bench_ring
    with pytest.raises(SystemExit) as exit_info:
        bench_ring.main(args)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("script,args,match", [
    ("bench_quant", ["--sections", "memory,nope"], "--sections 'memory,nope' names ['nope']; choose from"),
    ("bench_quant", ["--gemv", "block=4"], "--gemv 'block=4': unknown int4_gemv option 'block'"),
    ("bench_quant", ["--decode_ab", "block_n=256;convert=bogus"], "--decode_ab 'convert=bogus': int4_gemv: mode ''"),
    ("bench_quant", ["--decode", "bf16,int4 g128 layr"], "--decode 'bf16,int4 g128 layr' names ['int4 g128 layr']; "
                                                         "choose from bf16, W8A8"),
    ("bench_decode_attention", ["--batches", "1,x"], "--batches '1,x' is not a comma-separated list"),
    ("bench_galore", ["--ranks", "0"], "--ranks '0' is not a comma-separated list of positive integers"),
    ("bench_galore", ["--set", "model.d_modle=8"], "did you mean model.d_model?"),
    ("bench_galore", ["--steps", "1"], "use at least 2 timed steps"),
    ("bench_mamba_scan", ["--shapes", "8x2048x4096"], "--shapes '8x2048x4096' is not a comma-separated list of "
                                                      "AxBxCxD"),
    ("bench_mamba_scan", ["--splits", "1,-1"], "--splits '1,-1' is not a comma-separated list of integers >= 0"),
    ("bench_decode_floor", ["--steps", "0"], "--steps 0 and --reps 5: use at least 1 of each"),
    ("bench_decode_floor", ["--out", "/no_such_folder/floor.json"], "--out '/no_such_folder/floor.json': no folder"),
    ("bench_decode_floor", [], "the floor is measured on a GPU (this backend is cpu); --tiny checks"),
    ("bench_quant", ["--out", "/no_such_folder/q.json"], "--out '/no_such_folder/q.json': no folder /no_such_folder"),
    ("bench_ring", ["kernel", "--out", "/"], "--out '/': that is a folder; give a file in an existing folder"),
])
def test_benchmark_scripts_refuse_bad_flags_in_one_line(script, args, match, capsys, monkeypatch):
    import importlib
    monkeypatch.setattr("sys.argv", [script] + args)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"experiments.{script}").main()
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_out_file_refuses_what_it_could_not_write(tmp_path):
    from train import cli
    cli.out_file("")
    cli.out_file(str(tmp_path / "r.json"))  # a new file in an existing folder
    for path, match in ((str(tmp_path), "that is a folder"), (str(tmp_path / "no" / "r.json"), "no folder")):
        with pytest.raises(ValueError, match=f"--out '{path}': {match}"):
            cli.out_file(path)


def test_int_list():
    from train import cli
    assert cli.int_list("1,2,4", "--n") == [1, 2, 4] and cli.int_list("4x8192,1x16", "--s", 2) == [(4, 8192), (1, 16)]
    assert cli.int_list("0,2", "--n", minimum=0) == [0, 2]
    for text, parts in (("", 1), ("1,,2", 1), ("0", 1), ("-1", 1), ("4x", 2), ("4", 2), ("4x8x2", 2), ("a", 1)):
        with pytest.raises(ValueError, match="is not a comma-separated list"):
            cli.int_list(text, "--n", parts)


def test_multi_gpu_tables_name_an_empty_directory(tmp_path):
    from experiments import multi_gpu_tables
    with pytest.raises(SystemExit, match="holds no results of experiments/bench_multi_gpu.sh"):
        multi_gpu_tables.main(str(tmp_path))


def test_multi_gpu_tables_from_rows(tmp_path):
    """The scaling table joins the data and FSDP processes' rows; ring rows come by ring size, then length."""
    import json

    from experiments import multi_gpu_tables

    def write(name, rows):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))

    row = lambda tps, **kw: {"tokens_per_s": tps, "peak_mem_gb": 39.1, "planned_mem_gb": 30.0, **kw}  # noqa: E731
    write("scaling_1", {"gpu1": row(100.0)})
    write("scaling_4", {"data4": row(360.0)})
    write("scaling_4_fsdp", {"fsdp4": row(380.0)})
    for n, seq in ((4, 16384), (2, 8192), (4, 8192)):
        write(f"ring_1_{seq // n}", {f"full{seq // n}": {"step_s": 0.1, "flops_per_token": 1.0}})
        write(f"ring_{n}_{seq}", {f"ring{seq}": {"step_s": 0.3, "flops_per_token": 1.5},
                                  f"ring{seq}_unbalanced": {"step_s": 0.39}})
    scaling = multi_gpu_tables.scaling(str(tmp_path))
    assert "| data4 | 4 | 360 | 90 | 0.90 | 39.1 | 30.0 |" in scaling and "| fsdp4 | 4 | 380 | 95 | 0.95 |" in scaling
    ring = [line for line in multi_gpu_tables.ring(str(tmp_path)).splitlines() if line.startswith("| 8192 (")
            or line.startswith("| 16384 (")]
    assert [line.split(" |")[0] for line in ring] == ["| 8192 (2)", "| 8192 (4)", "| 16384 (4)"]
    assert "| 3.00 | 1.50 | +100.0% | 0.3900 | 1.30 |" in ring[0]


def test_device_seconds_sums_gpu_kernels_and_times_the_host_off_gpu(monkeypatch):
    """Off a GPU: the host-timed median (one warm-up, ``reps`` calls, nothing traced). On a GPU (stubbed: the
    backend's name and the trace's kernels): a warm-up, ``reps`` traced calls, the kernels' summed durations
    over reps."""
    calls = []
    f = jax.jit(lambda a: a * 2)
    x = jax.numpy.ones(8)

    def call():
        calls.append(1)
        return f(x)

    assert bench.device_seconds(call, reps=3) > 0 and len(calls) == 1 + 3
    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(bench, "kernel_events", lambda logdir: [("k", 0, 3000), ("k", 5000, 1500)])
    assert bench.device_seconds(call, reps=3) == pytest.approx(4500e-9 / 3) and len(calls) == 2 * (1 + 3)


def test_tabulate_sums_kernels_by_name_and_spans_the_wall():
    assert bench.tabulate([("a", 5, 10), ("b", 7, 2), ("a", 30, 5)]) == ({"a": (15, 2), "b": (2, 1)}, 30)
    assert bench.tabulate([]) == ({}, 0)


def test_decode_floor_chains_move_every_word_and_take_every_part():
    """``bench_decode_floor``: a chain's last output equals a NumPy replay of its stages (each read kernel summed
    every word it was given, each read-write stage updated its whole buffer in place, each took its predecessor's
    output), for Pallas and XLA reads; each chain's stages take every part of a layer once, loom's layer has the
    batch-1 step's kernels (6 a layer, 8 with int4's split sums) and its weights' bytes are bench_quant's."""
    from experiments import bench_decode_floor as floor
    from models import quant

    stages, words, steps = [("r", 3000), ("rw", 1200), ("r", 700), ("rw", 900), ("r", 100)], 16, 2
    bufs = [np.array(jax.random.bits(jax.random.PRNGKey(3 + i), (math.ceil(b / 4 / words), words), jnp.uint32))
            for i, (_, b) in enumerate(stages)]
    prev = np.zeros(8, np.uint32)
    for _ in range(steps):
        for (kind, _), buf in zip(stages, bufs):
            s = prev.sum(dtype=np.uint32)
            if kind == "rw":
                buf += s
                prev = buf[0, :8].copy()
            else:
                prev = np.full(8, buf[0].sum(dtype=np.uint32) + s, np.uint32)
    for reads in ("pallas", "xla"):
        _, last = floor.run_chain(stages, reads, words, steps, reps=1, interpret=True, seed=3)
        np.testing.assert_array_equal(last[0], prev)

    for label, params, cache, head, structures in floor.models(tiny=True):
        sizes, layers, head_bytes = floor.step_parts(params, cache, head)
        for name, structure in {**structures, "1 kernel": None}.items():
            kernels = {"loom's layer": 8 if "int4" in label else 6, "5 stages": 5, "1 kernel": 1}[name]
            st = floor.chain(structure, sizes, layers, head_bytes, "int4" in label)
            assert len(st) == kernels * layers + 2, (label, name)
        weights = sum(v for k, v in sizes.items() if not k.startswith("cache:")) * layers + head_bytes
        step_bytes = quant.memory_report(params)["model_bytes"] - (0 if "Mamba" in label else quant.tree_bytes(
            params["embed"]))  # bench_quant's bytes a step: all but the gathered table (Mamba's is its head)
        assert weights == step_bytes, label
        if label.startswith("1.26B bf16"):
            with pytest.raises(ValueError, match="stages take .* but a layer holds"):
                floor.chain([("qkv", ("wq", "wk", "wv"))], sizes, layers, head_bytes, False)
            with pytest.raises(ValueError, match="stage 'qkv' takes \\['w_qkv'\\], which a layer does not hold"):
                floor.chain([("qkv", ("w_qkv",))], sizes, layers, head_bytes, False)
