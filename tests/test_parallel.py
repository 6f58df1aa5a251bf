"""Parallelism: meshes, rules, shardings, sharded training equal to one device, and two processes.

Sharded runs use the real train step (``train.step.make_train_step``) on a tiny Transformer
over 8 host CPU devices and must give the single-device losses (rtol 1e-5); the parameter
and Adam-moment PartitionSpecs on the mixed mesh are checked against a hand-written table,
and every optimizer's state shardings against the logical axes it declares.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from models import transformer as T
from parallel import mesh as pmesh
from parallel import sharding
from parallel.sharding import DEFAULT_RULES
from tests import parallel_worker as W
from tests.conftest import xla_flags
from train import step as tstep

pytestmark = pytest.mark.timeout(40)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = {"data": 2, "fsdp": 2, "tensor": 2}
_RUNS: dict = {}


def run(mesh_cfg: dict, n_kv_heads: int = 2, optimizer: str = "adamw", mcfg=None):
    """(losses, state, shardings, axes) of W.train_losses, cached; ``{}`` runs on one device."""
    mcfg = mcfg or W.tiny_config(n_kv_heads)
    key = (json.dumps(mesh_cfg, sort_keys=True), mcfg, optimizer)
    if key not in _RUNS:
        devices = jax.devices()[:1] if not mesh_cfg else None
        _RUNS[key] = W.train_losses(pmesh.make_mesh(mesh_cfg, devices), mcfg, optimizer_name=optimizer)
    return _RUNS[key]


# ----------------------------------------------------------------------------- mesh

def test_make_mesh_order_sizes_and_axis_types():
    mesh = pmesh.make_mesh({"data": -1, "tensor": 2})
    assert mesh.axis_names == pmesh.MESH_AXES
    assert dict(mesh.shape) == {"data": 4, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 6
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]  # tensor pairs are neighbours
    assert pmesh.make_mesh({}, jax.devices()[:1]).size == 1


@pytest.mark.parametrize("cfg, match", [
    ({"data": 3, "fsdp": 2}, r"mesh data=3 x fsdp=2 = 6 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, r"mesh.data and mesh.fsdp are both -1"),
    ({"data": -1, "fsdp": 3}, r"fixed axes multiply to 3, which does not divide 8"),
    ({"data": 0}, r"mesh.data is 0; use a positive integer"),
    ({"tensor": -2, "data": -1}, r"mesh.tensor is -2"),
    ({"data": 8.0}, r"mesh.data is 8.0"),
    ({"data": 8, "model": 1}, r"mesh.model is not a mesh axis"),
])
def test_make_mesh_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        pmesh.make_mesh(cfg)


def test_initialize_distributed_single_process_and_errors(monkeypatch):
    for var in (pmesh.ENV_COORDINATOR, pmesh.ENV_NUM_PROCESSES, pmesh.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    unset = dict(coordinator_address="", num_processes=0, process_id=-1)
    assert pmesh.initialize_distributed(unset) is False
    assert pmesh.initialize_distributed({**unset, "num_processes": 1}) is False
    with pytest.raises(ValueError, match=r"num_processes is 2 but no coordinator address"):
        pmesh.initialize_distributed({**unset, "num_processes": 2})
    with pytest.raises(ValueError, match=r"coordinator_address is 'h:1' but distributed.num_processes is None"):
        pmesh.initialize_distributed({**unset, "coordinator_address": "h:1"})
    with pytest.raises(ValueError, match=r"process_id is 2 with 2 processes"):
        pmesh.initialize_distributed(dict(coordinator_address="h:1", num_processes=2, process_id=2))
    monkeypatch.setenv(pmesh.ENV_COORDINATOR, "h:1")
    monkeypatch.setenv(pmesh.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
        pmesh.initialize_distributed(unset)
    monkeypatch.setenv(pmesh.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"process_id is None with 2 processes"):
        pmesh.initialize_distributed(unset)


# ----------------------------------------------------------------------------- rules and checks

def test_validate_rules():
    mesh = pmesh.make_mesh(MIXED)
    sharding.validate_rules(DEFAULT_RULES, mesh)
    cases = [
        ((("hidden", "tensor"),), r"rule \('hidden', 'tensor'\) names an unknown logical axis 'hidden'"),
        ((("mlp", "model"),), r"rule \('mlp', 'model'\) uses 'model', which is not a mesh axis"),
        ((("batch", ("data", "dp")),), r"uses 'dp', which is not a mesh axis"),
        ((("mlp", "tensor"), ("mlp", None)), r"map 'mlp' more than once"),
        ((("mlp", ("tensor", "tensor")),), r"tuple of distinct mesh axes"),
        ((("mlp",),), r"is not a \(logical axis, mesh axes\) pair"),
    ]
    for rules, match in cases:
        with pytest.raises(ValueError, match=match):
            sharding.validate_rules(rules, mesh)


def tiny(**kw):
    return T.Config(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64), **kw})


def sizes(mcfg, batch=8, seq=16, accum=1):
    """What a Transformer's ``axis_sizes`` reports (the model protocol), with the batch and sequence, as train.setup
    builds them."""
    fields = dict(heads="n_heads", kv_heads="n_kv_heads", head_dim="head_dim", mlp="d_ff", vocab="vocab_size",
                  embed="d_model")
    out = {axis: (getattr(mcfg, field), f"model.{field}") for axis, field in fields.items()}
    out["batch"] = (batch // accum, "train.batch_size" if accum == 1 else "train.batch_size / optim.accum_steps")
    out["seq"] = (seq, "train.seq_len")
    return out


def check(mcfg, mesh, batch=8, seq=16, accum=1, extra=None):
    shapes = jax.eval_shape(lambda: T.init(mcfg, jax.random.PRNGKey(0)))
    axes = T.param_axes(mcfg)
    if extra:  # another array with its own axes (an adapter, an optimizer moment)
        shapes, axes = {"params": shapes, **extra[0]}, {"params": axes, **extra[1]}
    sharding.check_divisibility(shapes, axes, mesh, DEFAULT_RULES, sizes(mcfg, batch, seq, accum))


def test_a_function_traced_outside_the_sharding_context_is_traced_again_inside():
    """activate sets the mesh's abstract mesh, which jit's trace cache keys on: the same jitted function (and
    make_jaxpr) constrains its activations under the context and not outside it, in either order."""
    mesh = pmesh.make_mesh({"data": 8}, jax.devices()[:8])
    f = lambda x: sharding.constrain(x * 2.0, ("batch", None))  # noqa: E731
    jf, x = jax.jit(f), np.ones((8, 4), np.float32)

    def run(active):
        y = jf(x)
        assert ("sharding_constraint" in str(jax.make_jaxpr(f)(x))) == active
        assert (y.sharding.spec == P("data") if active else y.sharding.is_fully_replicated), y.sharding
        np.testing.assert_array_equal(y, 2.0 * x)

    run(False)
    with sharding.activate(mesh, DEFAULT_RULES):
        run(True)
    run(False)


def test_check_divisibility():
    mesh = pmesh.make_mesh({"tensor": 4, "data": 2})
    check(tiny(n_kv_heads=4), mesh)
    cases = [
        (tiny(d_model=48, n_heads=6), 8, 1, r"model.n_heads \(6\) is not divisible by the tensor axis \(4\) that "
                                            r"'heads' maps to; change model.n_heads, the mesh sizes, or the 'heads' "
                                            r"sharding rule"),
        # wq's merged heads*head_dim (2 * 16 = 32) divides by 4, but whole heads do not.
        (tiny(n_heads=2, n_kv_heads=2), 8, 1, r"model.n_heads \(2\) is not divisible"),
        (tiny(n_kv_heads=2), 8, 1, r"model.n_kv_heads \(2\) is not divisible by the tensor axis \(4\)"),
        (tiny(n_kv_heads=4, d_ff=66), 8, 1, r"model.d_ff \(66\) is not divisible"),
        (tiny(n_kv_heads=4, vocab_size=66), 8, 1, r"model.vocab_size \(66\) is not divisible"),
        (tiny(n_kv_heads=4), 5, 1, r"train.batch_size \(5\) is not divisible by the data axis \(2\) that "
                                   r"'batch' maps to"),
        (tiny(n_kv_heads=4), 8, 8, r"train.batch_size / optim.accum_steps \(1\) is not divisible"),
    ]
    for mcfg, batch, accum, match in cases:
        with pytest.raises(ValueError, match=match):
            check(mcfg, mesh, batch, accum=accum)
    with pytest.raises(ValueError, match=r"train.batch_size \(6\) is not divisible by the data x fsdp axes "
                                         r"\(2 x 2 = 4\) that 'batch' maps to"):
        check(tiny(), pmesh.make_mesh(MIXED), 6)
    with pytest.raises(ValueError, match=r"model.d_model \(36\) is not divisible by the fsdp axis \(8\)"):
        check(tiny(d_model=36, n_heads=2, n_kv_heads=2), pmesh.make_mesh({"fsdp": 8}))
    with pytest.raises(ValueError, match=r"train.seq_len \(12\) is not divisible by the context axis \(8\)"):
        check(tiny(), pmesh.make_mesh({"context": 8}), seq=12)


def test_check_divisibility_from_shapes_names_the_array():
    """Without sizes, every array's dimensions are checked against the axes they map to: a LoRA factor of
    rank 6 over a tensor axis of 4, a low-rank moment, a parameter whose family reports no size."""
    mesh = pmesh.make_mesh({"tensor": 4, "data": 2})
    mcfg = tiny(n_kv_heads=4)
    lora = ({"lora_a": jax.ShapeDtypeStruct((2, 32, 6), np.float32)}, {"lora_a": ("layers", "embed", "mlp")})
    with pytest.raises(ValueError, match=r"lora_a has 'mlp' dimension 2 of size 6, which the tensor axis \(4\) that "
                                         r"'mlp' maps to cannot split evenly"):
        check(mcfg, mesh, extra=lora)
    shapes = jax.eval_shape(lambda: T.init(tiny(d_ff=66, n_kv_heads=4), jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"layers/w_down has 'mlp' dimension 1 of size 66"):
        sharding.check_divisibility(shapes, T.param_axes(tiny(d_ff=66)), mesh, DEFAULT_RULES)
    fine = ({"lora_a": jax.ShapeDtypeStruct((2, 32, 8), np.float32)}, {"lora_a": ("layers", "embed", "mlp")})
    check(mcfg, mesh, extra=fine)


def test_state_shardings_rejects_wrong_rank():
    mcfg = W.tiny_config()
    tx = W.optimizer(mcfg)
    shape = jax.eval_shape(lambda: tstep.init_state(T, mcfg, tx, jax.random.PRNGKey(0)))
    axes = W.state_axes(mcfg, tx, shape)
    axes.params["layers"]["wq"] = ("embed", "heads")
    with pytest.raises(ValueError, match=r"state axes.params\['layers'\]\['wq'\] is \('embed', 'heads'\) but the "
                                         r"array has shape \(2, 32, 32\)"):
        sharding.state_shardings(axes, pmesh.make_mesh(MIXED), DEFAULT_RULES, shape)


def test_global_batch_single_process():
    mesh = pmesh.make_mesh(MIXED)
    assert sharding.process_batch_rows(mesh, DEFAULT_RULES, 8) == slice(0, 8)
    batch = sharding.global_batch(W.make_batches()[0], mesh, DEFAULT_RULES)
    assert batch["inputs"].shape == (8, 16)
    assert batch["inputs"].sharding == sharding.batch_sharding(mesh, DEFAULT_RULES)
    assert sharding.batch_sharding(mesh, DEFAULT_RULES).spec == P(("data", "fsdp", "expert"), "context")
    assert batch["inputs"].addressable_shards[0].data.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(batch["targets"]), W.make_batches()[0]["targets"])


# ----------------------------------------------------------------------------- sharded training

@pytest.mark.parametrize("mesh_cfg, n_kv_heads", [
    ({"data": 8}, 2), ({"fsdp": 8}, 2), ({"tensor": 4, "data": 2}, 4), (MIXED, 2)],
    ids=["data8", "fsdp8", "tensor4xdata2", "data2xfsdp2xtensor2"])
def test_sharded_training_matches_one_device(mesh_cfg, n_kv_heads):
    losses = run(mesh_cfg, n_kv_heads)[0]
    np.testing.assert_allclose(losses, run({}, n_kv_heads)[0], rtol=1e-5)
    assert len(set(losses)) == len(losses)  # the steps changed the parameters


# DEFAULT_RULES by hand: vocab->tensor, embed->fsdp, heads/kv_heads/mlp->tensor, layers->stage, norm->None.
MATRIX_IN_OUT = P("stage", "fsdp", "tensor")  # [layers, embed, heads|kv_heads|mlp]
MATRIX_OUT_IN = P("stage", "tensor", "fsdp")  # [layers, heads|mlp, embed]
GOLDEN = {
    "embed": P("tensor", "fsdp"),  # [vocab, embed]
    "head": P("fsdp", "tensor"),  # [embed, vocab]
    "final_norm": P(None),  # [norm]
    "layers": {
        "wq": MATRIX_IN_OUT, "wk": MATRIX_IN_OUT, "wv": MATRIX_IN_OUT, "wo": MATRIX_OUT_IN,
        "w_gate": MATRIX_IN_OUT, "w_up": MATRIX_IN_OUT, "w_down": MATRIX_OUT_IN,
        "attn_norm": P("stage", None), "mlp_norm": P("stage", None),  # [layers, norm]
    },
}


def test_golden_partition_specs_mixed_mesh():
    _, state, state_sh, _ = run(MIXED)
    specs = lambda tree: jax.tree.map(lambda x: x.sharding.spec, tree)  # noqa: E731
    assert specs(state.params) == GOLDEN
    adam = state.opt_state[1][0]  # chain(clip, adamw(scale_by_adam, masked decay, schedule))
    assert specs(adam.mu) == GOLDEN and specs(adam.nu) == GOLDEN
    assert adam.count.sharding.spec == P() and state.step.sharding.spec == P()
    assert jax.tree.map(lambda s: s.spec, state_sh.params) == GOLDEN
    # [layers=2, d_model=32 / fsdp 2, 4 heads * 8 / tensor 2] per device
    assert state.params["layers"]["wq"].addressable_shards[0].data.shape == (2, 16, 16)
    assert int(state.step) == W.STEPS


# Dimensions of 128 so that Adafactor factors its second moments (it factors dims >= 128).
WIDE = W.T.Config(vocab_size=128, d_model=128, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, dtype="float32",
                  attention="xla")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_optimizer_state_sharded_by_its_axes_and_step_matches_one_device(name):
    """On fsdp=4 x tensor=2, every optimizer-state leaf is sharded as its declared logical axes map
    (Adafactor's row and column moments: the matrix's axes without the reduced one) and the
    sharded steps give the single-device losses and parameters."""
    mesh_cfg = {"fsdp": 4, "tensor": 2}
    losses, state, state_sh, axes = run(mesh_cfg, optimizer=name, mcfg=WIDE)
    ref_losses, ref_state, _, _ = run({}, optimizer=name, mcfg=WIDE)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # SGD's update is linear in the gradients; sign-like updates (Adam, Lion, Adafactor) turn rounding in
    # near-zero gradients into up to a few percent of one step of lr 1e-2 for single elements
    atol = 1e-7 if name == "sgd" else 2e-3
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)
    leaves = jax.tree.leaves(state.opt_state)
    names = jax.tree.leaves(axes.opt_state, is_leaf=sharding.is_axes)
    assert len(leaves) == len(names)
    specs = [sharding.logical_to_spec(n, DEFAULT_RULES) for n in names]
    for leaf, spec in zip(leaves, specs):
        assert leaf.sharding.spec == spec
    assert sum(any(spec) for spec in specs) >= 9  # the moments are sharded, not replicated
    if name == "adafactor":
        factored = state.opt_state[1][0]
        # embed [vocab 128 -> tensor, d_model 128 -> fsdp]: rows drop the first of the two largest (equal) dims
        assert {factored.v_row["embed"].sharding.spec, factored.v_col["embed"].sharding.spec} == {P("fsdp"),
                                                                                                   P("tensor")}
        assert factored.v_row["layers"]["wq"].sharding.spec in (P("stage", "fsdp"), P("stage", "tensor"))


# ----------------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 CPU devices, each feeding its half of the batch, equal 1 process x 8 devices; greedy
    decoding on that mesh (rows sharded over both processes) gives the one-process tokens.

    Process 0 is configured through the config, process 1 through the JAX_* environment variables.
    """
    address = f"localhost:{_free_port()}"
    base = {k: v for k, v in os.environ.items() if k not in (pmesh.ENV_COORDINATOR, pmesh.ENV_NUM_PROCESSES,
                                                           pmesh.ENV_PROCESS_ID)}
    # The suite's compile settings (tests/conftest.py) with 4 devices each; losses agree to ~1e-7.
    base.update(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    setups = [(dict(coordinator_address=address, num_processes=2, process_id=0), base),
              ({}, {**base, pmesh.ENV_COORDINATOR: address, pmesh.ENV_NUM_PROCESSES: "2",
                    pmesh.ENV_PROCESS_ID: "1"})]
    procs, logs, hung = [], [], False
    try:
        for i, (dist, env) in enumerate(setups):
            logs.append(open(tmp_path / f"worker{i}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py"), json.dumps(dist),
                 json.dumps(MIXED), str(tmp_path / f"out{i}.json")], env=env, cwd=ROOT, stdout=logs[i],
                stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 150
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        output = []
        for f in logs:
            f.seek(0)
            output.append(f.read()[-3000:])
            f.close()
    assert not hung, "a worker hung past 150 s and was killed:\n" + "\n".join(output)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(output)
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [o["rows"] for o in outs] == [[0, 4], [4, 8]]
    assert all(o["n_devices"] == 8 and o["n_local"] == 4 for o in outs)
    reference, state, _, _ = run(MIXED)
    expected = W.generate_greedy(pmesh.make_mesh(MIXED), state.params, W.tiny_config())
    for o in outs:
        np.testing.assert_allclose(o["losses"], reference, rtol=1e-5)
        assert o["generated"] == expected
