"""Ahead-of-time compilation for TPU topologies (train/aot.py), on CPU with libtpu's compiler."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu")

from experiments import arith_cot
from parallel import mesh as mesh_lib
from train import aot

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=2", "--config.model.d_ff=128", "--config.train.batch_size=16",
        "--config.train.seq_len=64"]


@pytest.fixture(autouse=True)
def no_tpu_programs_in_the_compilation_cache():
    """The suite's persistent compilation cache (tests/conftest.py) cannot load a TPU program back without a
    TPU client, so none is written: a later compile of the same program would warn and compile again."""
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def tiny_config(**mesh):
    c = arith_cot.get_config()
    c.model.update(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=128)
    c.train.update(batch_size=16, seq_len=64)
    c.mesh.update(**mesh)
    return c


def test_compiles_for_v5e_2x2_and_reports_per_chip_memory():
    report = aot.compile_for_topology(tiny_config(data=-1), "v5e:2x2")
    assert report.chips == 4 and report.device_kind == "TPU v5 lite"
    assert report.mesh_shape == {"data": 4, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    assert report.hbm_bytes == 16 * aot.GiB and report.fits
    assert report.argument_bytes > 0 and report.code_bytes > 0 and 0 < report.total_bytes < report.hbm_bytes
    # data parallel: every chip holds the whole state (TPU layouts pad it) and a quarter of the batch
    c = tiny_config()
    setup = aot.setup_training(c, mesh_lib.make_mesh(c.mesh, devices=aot.topology_devices("v5e:2x2")))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state_shape))
    assert report.argument_bytes >= state_bytes + 5 * 16 * 64 * 4 // 4
    # the donated state is written in place: outputs alias (almost) all of it
    assert report.alias_bytes >= state_bytes
    assert report.flops is not None and report.flops > 0 and report.model_flops > 0
    text = report.format()
    for piece in ("v5e:2x2 (TPU v5 lite, 4 chips)", "data=4", "arguments", "temporaries", "generated code",
                  "of 16 GiB HBM"):
        assert piece in text, piece


def test_fsdp_shards_the_state_over_the_chips():
    replicated = aot.compile_for_topology(tiny_config(data=-1), "v5e:2x2")
    fsdp = aot.compile_for_topology(tiny_config(data=1, fsdp=4), "v5e:2x2")
    assert fsdp.mesh_description() == "fsdp=4"
    assert fsdp.argument_bytes < replicated.argument_bytes / 3


def test_cpu_backend_untouched():
    before = jax.devices()
    aot.compile_for_topology(tiny_config(), "v5e:2x2")
    assert jax.devices() == before and {d.platform for d in before} == {"cpu"}
    np.testing.assert_allclose(jax.jit(lambda x: x * 2)(jnp.ones(3)), 2.0)


@pytest.mark.parametrize("mesh, match", [
    (dict(fsdp=8), r"v5e:2x2 has 4 devices: mesh data=-1 x fsdp=8 cannot cover 4 devices"),
    (dict(data=2, fsdp=4), r"v5e:2x2 has 4 devices: mesh data=2 x fsdp=4 = 8 devices but 4 are available"),
    (dict(data=1, tensor=4), r"model\.n_heads \(2\) is not divisible by the tensor axis \(4\)"),
])
def test_mesh_that_does_not_fit_the_topology(mesh, match):
    with pytest.raises(ValueError, match=match):
        aot.compile_for_topology(tiny_config(**mesh), "v5e:2x2")


def test_too_big_for_hbm():
    """float32 logits of 512 x 1024 x 65536 are 128 GiB: 32 GiB per chip, twice a v5e's HBM."""
    c = tiny_config(data=-1)
    c.model.vocab_size = 65536
    c.train.update(batch_size=512, seq_len=1024)
    with pytest.raises(aot.DoesNotFit, match=r"does not fit in the 16 GiB HBM of a TPU v5 lite chip on v5e:2x2"):
        aot.compile_for_topology(c, "v5e:2x2")


def test_budget_below_the_compiled_total():
    with pytest.raises(aot.DoesNotFit, match=r"MiB more than the 1 MiB budget \(of its HBM\) of a TPU v5 lite") as info:
        aot.compile_for_topology(tiny_config(), "v5e:2x2", hbm_bytes=aot.MiB)
    assert info.value.report is not None and not info.value.report.fits
    assert "budget" in info.value.report.format()


@pytest.mark.parametrize("name", ["v5e", "v5e:4", "v5e:2x2x2", "v5p:2x2", "v3:2x2", "tpu:4x4"])
def test_unknown_topology_names(name):
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        aot.parse_topology(name)


def test_other_generations():
    assert aot.parse_topology("v5p:2x2x2") == ("v5p", (2, 2, 2))
    for name, kind, n in (("v5p:2x2x1", "TPU v5", 4), ("v4:2x2x1", "TPU v4", 4), ("v6e:2x2", "TPU v6 lite", 4),
                          ("v5e:1x1", "TPU v5 lite", 1)):
        devices = aot.topology_devices(name)
        assert len(devices) == n and {d.device_kind for d in devices} == {kind}, name
    with pytest.raises(ValueError, match="not a valid v5e slice"):
        aot.topology_devices("v5e:3x3")


def _command(*args):
    # the command picks the CPU itself; no compilation cache (its TPU programs could not be loaded back)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
    return subprocess.run([sys.executable, "-m", "train.aot", "--config", "experiments/arith_cot.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)


def test_command_line():
    ok = _command("--topology", "v5e:2x2", *TINY)
    assert ok.returncode == 0, ok.stderr
    assert "v5e:2x2 (TPU v5 lite, 4 chips)" in ok.stdout and "of 16 GiB HBM" in ok.stdout
    assert "WARNING" not in ok.stderr  # libtpu finds what it needs in the environment
    bad = _command("--topology", "v5e:2x2", *TINY, "--config.mesh.fsdp=8")
    assert bad.returncode == 1 and "error: v5e:2x2 has 4 devices: mesh" in bad.stderr
    assert "Traceback" not in bad.stderr
