"""The trainer: smoke run of the default experiment, exact resume, SIGTERM, crash during a save,
corrupt and incompatible checkpoints, config validation, gradient accumulation, objectives (LM and
the paired margin against float64 references), frozen parameters and every optimizer."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import models
from parallel import mesh as mesh_lib
from tests.helpers import DEFAULT_CODEGEN, FAST_COMPILE, jit, tiny_train_config
from train import checkpoint, evaluate, metrics, objective as objective_lib, optim, step as step_lib, trainer
from train.config import validate
from train.setup import setup_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tiny_config = tiny_train_config

# The run most tests share: the default experiment at the tiny size, 8 steps, with every in-loop
# evaluation at its last step and a profile of steps 2-3.
SHARED = dict(eval_every=8, exact_match_every=8, exact_match_n=2, exact_match_steps=(1, 2), max_new_tokens=40,
              profile_steps=(2, 4))


def shared_config():
    return tiny_config(**SHARED)


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(workdir, result) of the shared run, uninterrupted, with one more evaluation registered (on the loss
    eval's cadence) to show that the loop runs whatever the registry holds."""
    path = tmp_path_factory.mktemp("straight")
    calls = []

    def probe(ev, params):
        calls.append(ev.config.train.steps)
        return {"probe/parameters": float(sum(x.size for x in jax.tree.leaves(params)))}

    evaluate.EVALS["probe"] = evaluate.Eval(probe, every="eval_every")
    try:
        result = trainer.run(shared_config(), str(path))
    finally:
        del evaluate.EVALS["probe"]
    assert calls == [8]
    return path, result


@pytest.mark.timeout(240)
def test_default_experiment_smoke(straight):
    path, result = straight
    for name in ("metrics.jsonl", "loss.png", "config.json", "run_info.json", "results.json"):
        assert (path / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(path / "tensorboard"))
    assert json.loads((path / "config.json").read_text())["train"]["steps"] == 8
    assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(path / "profile") for f in fs)
    assert json.loads((path / "run_info.json").read_text())["git_revision"]
    recorded = losses(str(path))
    assert sorted(recorded) == list(range(1, 9)) and recorded[8] < recorded[1]
    assert 0 <= result["exact_match/1"] <= 1 and "eval_loss" in result and result["tokens_per_s"] > 0
    assert result["tokens"] > 0 and result["grad_norm"] > 0  # the LM objective's weight, the step's norm
    assert result["probe/parameters"] > 1000  # the registered extra evaluation ran at step 8 and was logged


@pytest.mark.timeout(300)
def test_command_line_runs_default_experiment_with_overrides(tmp_path):
    """`python -m train` on the default config itself (its model size), a few tens of steps, 1 device."""
    cmd = [sys.executable, "-m", "train", "--config", "experiments/arith_cot.py", "--workdir", str(tmp_path),
           "--config.train.steps=20", "--config.train.eval_every=20", "--config.train.exact_match_every=0",
           "--config.train.progress=False", "--config.optim.warmup_steps=5", "--config.train.ckpt_every=10"]
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    recorded = losses(str(tmp_path))
    assert max(recorded) == 20 and recorded[20] < recorded[10] < 0.5 * np.log(259)  # from ln(vocab) at init
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 128


@pytest.mark.timeout(300)
def test_interrupted_and_resumed_run_has_bitwise_equal_losses(straight, tmp_path):
    """Interrupted mid-interval, inside the profile window, and before the last step's evaluations."""
    c = shared_config()
    trainer.run(c, str(tmp_path), stop_after=3)  # mid-interval: saved on stop
    trainer.run(c, str(tmp_path), stop_after=6)
    result = trainer.run(c, str(tmp_path))
    assert sorted(losses(str(tmp_path))) == list(range(1, 9))
    assert losses(str(straight[0])) == losses(str(tmp_path))  # bitwise: same floats at every step
    assert result["eval_loss"] == straight[1]["eval_loss"]


@pytest.mark.timeout(300)
def test_paired_objective_with_exact_resume(tmp_path):
    """The paired experiment (pair_margin on arithmetic_pairs) at the tiny size, straight and interrupted once:
    bitwise equal losses (the pairs' data position resumes too), and the held-out pairs evaluated. (The
    command line is tested on the default experiment above; ORPO/DPO runs in tests/test_orpo.py.)"""
    from experiments import arith_pairs

    c = arith_pairs.get_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32")
    c.data.max_steps = 3
    c.train.update(steps=6, batch_size=8, seq_len=64, log_every=1, eval_every=6, eval_batches=1, exact_match_every=0,
                   ckpt_every=2, progress=False)
    c.optim.warmup_steps = 2
    trainer.run(c, str(tmp_path / "straight"))
    trainer.run(c, str(tmp_path / "resumed"), stop_after=3)
    result = trainer.run(c, str(tmp_path / "resumed"))
    straight = losses(str(tmp_path / "straight"))
    assert sorted(straight) == list(range(1, 7)) and straight == losses(str(tmp_path / "resumed"))
    assert straight[6] < straight[1]  # the margin loss falls (from about log 2 + the chosen NLL)
    assert result["pairs"] == 8 and 0 <= result["accuracy"] <= 1 and 0 <= result["eval_accuracy"] <= 1
    assert {"eval_loss", "eval_margin", "eval_chosen_nll"} <= set(result)


def _spawn(code: str, workdir, env_extra=None):
    env = {**os.environ, **(env_extra or {})}  # same 8 CPU devices as this process (conftest)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


TRAIN_SCRIPT = """
    import sys
    from tests.helpers import tiny_train_config as tiny_config
    from train import trainer
    {patch}
    trainer.run(tiny_config(steps={steps}), sys.argv[1])
"""


@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _spawn(TRAIN_SCRIPT.format(patch="", steps=100000), tmp_path)
    deadline = time.time() + 200
    while not losses(str(tmp_path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last_logged = max(losses(str(tmp_path)))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=3)
    assert ckpt.latest_step() == last_logged
    ckpt.close()


@pytest.mark.timeout(300)
def test_run_killed_during_save_resumes_from_last_complete_checkpoint(straight, tmp_path):
    patch = """
    import os, signal
    from train import checkpoint
    real_save = checkpoint.Checkpointer.save
    def save(self, step, state, data_state, wait=False):
        real_save(self, step, state, data_state, wait=wait)
        if step == 4:  # the async write of step 4 has started, not finished
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save
    """
    proc = _spawn(TRAIN_SCRIPT.format(patch=textwrap.dedent(patch).replace("\n", "\n    "), steps=8), tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, out
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=2, keep=3)
    assert ckpt.latest_step() == 2
    ckpt.close()
    trainer.run(shared_config(), str(tmp_path))
    resumed, uninterrupted = losses(str(tmp_path)), losses(str(straight[0]))
    assert all(resumed[s] == uninterrupted[s] for s in range(3, 9))


def _tree_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.mark.timeout(240)
def test_incompatible_checkpoint_is_reported_and_left_untouched(straight, tmp_path):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    before = _tree_digest(tmp_path / "checkpoints")
    other = tiny_config(steps=12)
    other.model.d_model = 48
    with pytest.raises(checkpoint.CheckpointError, match="left untouched"):
        trainer.run(other, str(tmp_path))
    assert _tree_digest(tmp_path / "checkpoints") == before
    other = tiny_config(steps=12)
    other.optim.name = "lion"  # another optimizer state: refused the same way
    with pytest.raises(checkpoint.CheckpointError, match="optim.name or optim.frozen, and was left untouched"):
        trainer.run(other, str(tmp_path))
    assert _tree_digest(tmp_path / "checkpoints") == before


@pytest.mark.timeout(240)
def test_corrupt_checkpoint_is_reported_and_left_untouched(straight, tmp_path):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    state_dir = tmp_path / "checkpoints" / "8" / "state"
    victims = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs if f != "commit_success.txt"]
    assert len(victims) > 3
    for victim in victims:  # every array and metadata file of the state becomes garbage
        with open(victim, "wb") as f:
            f.write(b"\x00garbage")
    before = _tree_digest(tmp_path / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="left untouched"):
        trainer.run(tiny_config(steps=12), str(tmp_path))
    assert _tree_digest(tmp_path / "checkpoints") == before


@pytest.mark.parametrize("section,field,value,words", [
    ("model", "family", "rnn", "model.family"),
    ("model", "attention", "flash", "model.attention"),
    ("model", "d_ff", 0, "model.d_ff"),
    ("train", "batch_size", 0, "train.batch_size"),
    ("train", "eval_every", 50, "train.eval_every"),
    ("train", "ckpt_every", -1, "train.ckpt_every"),
    ("optim", "accum_steps", 3, "optim.accum_steps"),
    ("model", "vocab_size", 100, "model.vocab_size"),
    ("data", "source", "web", "data.source"),
    ("train", "loss_chunk", 48, "train.loss_chunk"),
    ("train", "profile_steps", (5, 3), "train.profile_steps"),
    ("train", "objective", "dpo", "train.objective"),
    ("train", "objective", "pair_margin", "but data.source='arithmetic' yields"),
    ("optim", "name", "adam", "optim.name"),
    ("optim", "frozen", "layers/(", "optim.frozen"),
    ("train", "cot_every", 9, "train.cot_every"),
])
def test_invalid_config_fails_before_compiling_naming_the_field(section, field, value, words):
    c = tiny_config()
    c[section][field] = value
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        validate(c)


def test_frozen_pattern_must_match_some_but_not_every_parameter():
    c = tiny_config()
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    c.optim.frozen = "layers/attn"  # fullmatch: a prefix alone matches nothing
    with pytest.raises(ValueError, match=r"optim.frozen \('layers/attn'\) matches no parameter path"):
        setup_training(c, mesh)
    c.optim.frozen = ".*"
    with pytest.raises(ValueError, match=r"freezes every parameter"):
        setup_training(c, mesh)


# ----------------------------------------------------------------------------- steps, objectives, optimizers

def lm_batch(b=4, s=16, seed=0, vocab=200):
    rng = np.random.default_rng(seed)
    batch = {"inputs": rng.integers(3, vocab, (b, s)), "targets": rng.integers(3, vocab, (b, s)),
             "segment_ids": np.ones((b, s), np.int32), "positions": np.tile(np.arange(s), (b, 1)),
             "loss_mask": (rng.random((b, s)) < 0.7).astype(np.int32)}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), batch)


def pair_batch(b=4, s=16, seed=0, vocab=200):
    """Hand-built pairs: rows share a prompt (loss_mask 0), responses differ (loss_mask 1 after it)."""
    rng = np.random.default_rng(seed)
    out = {}
    prompt = rng.integers(3, vocab, (b, s // 2))
    for side in ("chosen", "rejected"):
        tokens = np.concatenate([prompt, rng.integers(3, vocab, (b, s // 2 + 1))], axis=1)
        length = rng.integers(3, s // 2 + 1, b)  # response tokens per row; the rest is padding
        mask = np.zeros((b, s), np.int32)
        for r in range(b):
            mask[r, s // 2 - 1:s // 2 - 1 + length[r]] = 1
        out.update({f"{side}_inputs": tokens[:, :-1], f"{side}_targets": tokens[:, 1:],
                    f"{side}_segment_ids": np.ones((b, s), np.int32),
                    f"{side}_positions": np.tile(np.arange(s), (b, 1)), f"{side}_loss_mask": mask})
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), out)


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def row_logp64(model, mcfg, params, batch, side):
    """float64 sum over loss-masked tokens of log p(target), per row, from the model's float32 logits."""
    logits, _ = model.apply(params, batch[f"{side}_inputs"], mcfg)
    logp = log_softmax64(logits)
    picked = np.take_along_axis(logp, np.asarray(batch[f"{side}_targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch[f"{side}_loss_mask"], np.float64)
    return (picked * mask).sum(-1), mask.sum(-1)


@pytest.fixture(scope="module")
def tiny_model():
    c = tiny_config()
    model = models.get("transformer")
    mcfg = model.from_config(c.model)
    return c, model, mcfg, jit(model.init, static_argnums=0)(mcfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("beta, nll_weight", [(1.0, 0.0), (0.5, 0.3)])
def test_pair_margin_matches_float64_reference(tiny_model, beta, nll_weight):
    """-log sigmoid(beta (log p(chosen) - log p(rejected))) + nll_weight NLL(chosen)/|chosen|, summed over pairs."""
    _, model, mcfg, params = tiny_model
    batch = pair_batch()
    obj = objective_lib.pair_margin_objective(beta=beta, nll_weight=nll_weight, loss_chunk=0)
    out = jit(lambda p, b: obj.loss(model, mcfg, p, b))(params, batch)
    lc, nc = row_logp64(model, mcfg, params, batch, "chosen")
    lr, _ = row_logp64(model, mcfg, params, batch, "rejected")
    margin = lc - lr
    per_pair = np.log1p(np.exp(-beta * margin)) + nll_weight * (-lc) / nc
    np.testing.assert_allclose(out.total, per_pair.sum(), rtol=1e-5)
    np.testing.assert_allclose(out.sums["loss"], per_pair.sum(), rtol=1e-5)
    np.testing.assert_allclose(out.sums["margin"], margin.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.sums["chosen_nll"], (-lc / nc).sum(), rtol=1e-5)
    assert float(out.sums["accuracy"]) == float((margin > 0).sum()) and float(out.weight) == 4
    assert set(out.sums) == set(obj.logs)
    chunked = objective_lib.pair_margin_objective(beta=beta, nll_weight=nll_weight, loss_chunk=4)
    np.testing.assert_allclose(jit(lambda p, b: chunked.loss(model, mcfg, p, b))(params, batch).total,
                               per_pair.sum(), rtol=1e-5)


def test_lm_objective_matches_float64_reference_and_adds_aux_losses_per_token(tiny_model):
    """total = NLL + tokens x sum(aux["losses"]); sums["loss"] the NLL alone; aux metrics pass through."""
    _, model, mcfg, params = tiny_model
    batch = lm_batch()
    logits, _ = model.apply(params, batch["inputs"], mcfg)
    picked = np.take_along_axis(log_softmax64(logits), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    nll, tokens = -(picked * mask).sum(), mask.sum()

    class WithAux:  # the model, whose blocks also report an auxiliary loss and a metric
        def __getattr__(self, name):
            return getattr(model, name)

        @staticmethod
        def blocks(*args, **kwargs):
            x, cache, aux = model.blocks(*args, **kwargs)
            return x, cache, {**aux, "losses": {"x/loss": jnp.float32(0.25)},
                              "metrics": {"x/m/layer1": jnp.float32(3.0)}}

    obj = objective_lib.lm_objective(loss_chunk=0)
    plain = obj.loss(model, mcfg, params, batch)
    np.testing.assert_allclose(plain.total, nll, rtol=1e-6)
    assert float(plain.weight) == tokens and plain.means == {} and set(plain.sums) == set(obj.logs)
    aux = obj.loss(WithAux(), mcfg, params, batch)
    np.testing.assert_allclose(aux.total, nll + tokens * 0.25, rtol=1e-6)
    np.testing.assert_allclose(aux.sums["loss"], nll, rtol=1e-6)
    assert {k: float(v) for k, v in aux.means.items()} == {"x/loss": 0.25, "x/m/layer1": 3.0}


def make_setup(**optim_fields):
    c = tiny_config()
    c.optim.update(warmup_steps=0, **optim_fields)
    return setup_training(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:1]))


@pytest.mark.timeout(120)
def test_gradient_accumulation_equals_full_batch():
    """SGD (an update linear in the gradients, from the first step) with and without 2 microbatches."""
    setup = make_setup(name="sgd", momentum=0.0, lr=0.5)
    state = jit(setup.init_fn)(jax.random.PRNGKey(0))
    model, mcfg, tx, obj = setup.model, setup.mcfg, setup.tx, setup.objective
    batch = lm_batch()
    full, m_full = jit(step_lib.make_train_step(model, mcfg, tx, obj))(state, batch)
    accum, m_accum = jit(step_lib.make_train_step(model, mcfg, tx, obj, accum_steps=2))(state, batch)
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-6)
    assert float(m_full["tokens"]) == float(m_accum["tokens"]) == float(batch["loss_mask"].sum())
    chex.assert_trees_all_close(full.params, accum.params, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_step_with_nothing_frozen_is_the_plain_optax_step():
    """The train step equals value_and_grad of the summed loss / tokens, then clip + AdamW (to float32
    rounding: the two are different programs)."""
    setup = make_setup()
    state = jit(setup.init_fn)(jax.random.PRNGKey(0))
    batch = lm_batch()

    def plain(state, batch):
        def mean_loss(p):
            out = setup.objective.loss(setup.model, setup.mcfg, p, batch, train=True,
                                       rng=step_lib.step_rng(setup.config.seed, state.step))
            return out.total, out.weight
        (total, tokens), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    options = {**FAST_COMPILE, **DEFAULT_CODEGEN}  # two programs compared to float32 rounding
    new, _ = jax.jit(setup.train_step, compiler_options=options)(state, batch)
    params, opt_state = jax.jit(plain, compiler_options=options)(state, batch)
    chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=0)
    chex.assert_trees_all_close(new.opt_state, opt_state, rtol=1e-5, atol=0)
    assert not np.array_equal(new.params["head"], state.params["head"])


FROZEN = "layers/.*norm|embed"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_frozen_leaves_unchanged_and_without_optimizer_state(name):
    """Three steps with "layers/.*norm|embed" frozen: those leaves bitwise equal to their init and absent
    from the optimizer state (which holds exactly the trainable leaves' moments); every other leaf moves
    and equals the step of a model whose frozen leaves are constants of the loss."""
    setup = make_setup(name=name, frozen=FROZEN, weight_decay=0.1)
    frozen_paths = {"embed", "layers/attn_norm", "layers/mlp_norm"}
    got = {path for path, f in path_items(setup.frozen) if f}
    assert got == frozen_paths
    init = jit(setup.init_fn)(jax.random.PRNGKey(0))
    state = init
    step = jit(setup.train_step)  # nothing donated: ``init`` is compared below
    for i in range(3):
        state, metrics_ = step(state, lm_batch(seed=i))
    for (path, before), after in zip(path_items(init.params), jax.tree.leaves(state.params)):
        if path in frozen_paths:
            assert np.array_equal(before, after), path
        else:
            assert not np.array_equal(before, after), path
    # no optimizer-state leaf belongs to a frozen parameter; every trainable one has state
    opt_paths = [p for p, _ in path_items(state.opt_state)]
    assert not [p for p in opt_paths if any(p.endswith("/" + f) for f in frozen_paths)]
    trainable_paths = [p for p, f in path_items(setup.frozen) if not f]
    assert all(any(p.endswith("/" + t) for p in opt_paths) for t in trainable_paths)

    # the same three steps on the trainable leaves alone, the frozen ones closed over as constants
    trainable = optim.trainable(init.params, setup.frozen)
    axes = jax.tree.map(lambda a, f: None if f else a, setup.model.param_axes(setup.mcfg), setup.frozen,
                        is_leaf=lambda x: type(x) is tuple)
    tx = optim.make_optimizer(setup.config.optim, setup.config.train.steps, axes)
    view, opt_state = trainable, tx.init(trainable)

    @jit
    def reference(view, opt_state, batch, i):
        def total(v):
            out = setup.objective.loss(setup.model, setup.mcfg, optim.merge(v, init.params), batch, train=True,
                                       rng=step_lib.step_rng(setup.config.seed, i))
            return out.total, out.weight
        (_, tokens), grads = jax.value_and_grad(total, has_aux=True)(view)
        updates, opt_state = tx.update(jax.tree.map(lambda g: g / tokens, grads), opt_state, view)
        return optax.apply_updates(view, updates), opt_state

    for i in range(3):
        view, opt_state = reference(view, opt_state, lm_batch(seed=i), i)
    # sign-like updates (Adam, Lion, Adafactor) turn rounding in near-zero gradients into up to ~lr/1000
    atol = 1e-7 if name == "sgd" else 1e-5
    chex.assert_trees_all_close(optim.trainable(state.params, setup.frozen), view, rtol=1e-5, atol=atol)
    chex.assert_trees_all_equal_structs(state.opt_state, opt_state)


def path_items(tree):
    from parallel.sharding import path_name

    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_state_is_checkpointed_and_restored(tmp_path):
    setup = make_setup(frozen=FROZEN)
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(3))
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    ckpt.save(1, state, {"position": 7}, wait=True)
    restored, data_state, step = ckpt.restore(setup.abstract_state())
    ckpt.close()
    assert step == 1 and data_state == {"position": 7}
    chex.assert_trees_all_equal(restored, state)


@pytest.mark.timeout(120)
def test_chunked_cross_entropy_equals_whole_sequence(tiny_model):
    _, model, mcfg, params = tiny_model
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, mcfg.d_model)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, mcfg.vocab_size, (2, 16)))
    mask = jnp.asarray(rng.random((2, 16)) < 0.8, jnp.float32)

    def loss(p, chunk, per_row=False):
        return objective_lib.token_nll(model, mcfg, p, x, targets, mask, chunk, per_row=per_row)

    logp = log_softmax64(model.head(params, x, mcfg))  # float64 reference of the formula
    rows = -(np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(mask)).sum(-1)
    np.testing.assert_allclose(loss(params, 0), rows.sum(), rtol=1e-6)
    np.testing.assert_allclose(loss(params, 4), rows.sum(), rtol=1e-6)
    np.testing.assert_allclose(loss(params, 4, True), rows, rtol=1e-6)
    np.testing.assert_allclose(loss(params, 0, True), rows, rtol=1e-6)
    chex.assert_trees_all_close(jax.grad(loss)(params, 4), jax.grad(loss)(params, 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family, kept", [
    ("transformer", {"attn_norm", "mlp_norm", "final_norm"}),
    ("mamba", {"norm", "A_log", "D", "dt_bias", "conv_b", "final_norm"}),
])
def test_weight_decay_only_on_matrices_not_stacked_vectors_or_a_log(family, kept):
    """One AdamW step with zero gradients leaves norms, biases, D, dt_bias and A_log (stacked over layers:
    2-D, yet not matrices) unchanged and moves every other parameter by exactly -lr * wd * p."""
    c = tiny_config()
    if family == "mamba":
        c.model = ml_collections.ConfigDict(dict(family="mamba", vocab_size=259, d_model=16, n_layers=2, d_state=4,
                                                 tie_embeddings=False))
    c.optim.update(warmup_steps=0, clip_norm=0.0, weight_decay=0.5, lr=0.1, end_lr_ratio=1.0)
    model = models.get(family)
    mcfg = model.from_config(c.model)
    shapes = jax.eval_shape(lambda: model.init(mcfg, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(0).normal(size=s.shape), s.dtype), shapes)
    tx = optim.make_optimizer(c.optim, 10, model.param_axes(mcfg))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), jax.jit(tx.init)(params), params)
    names = set()
    for (path, p), u in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates)):
        name = path[-1].key
        names.add(name)
        if name in kept:
            assert not np.any(np.asarray(u)), name
        else:
            np.testing.assert_allclose(u, -0.1 * 0.5 * np.asarray(p), rtol=1e-6, atol=1e-12, err_msg=name)
    assert kept < names  # every kept name exists, and some parameters are decayed


def test_decay_mask_ignores_stacking_axes_and_frozen_leaves():
    axes = {"w": ("layers", "sublayers", "embed", "mlp"), "stacked_norm": ("layers", "sublayers", "norm"),
            "x_proj": ("layers", "inner", None), "a": ("layers", "inner", "state"), "frozen": None,
            "bias": ("layers", "sublayers", None)}
    assert optim.decay_mask(axes) == {"w": True, "stacked_norm": False, "x_proj": True, "a": False, "frozen": None,
                                      "bias": False}


def test_adafactor_state_axes_drop_the_reduced_dimension():
    """Adafactor's row/column moments of a factored [layers, 256, 128] matrix: its axes without the
    largest (rows) or second-largest (columns) dimension; an unfactored vector keeps a full moment."""
    params = {"w": jax.ShapeDtypeStruct((2, 256, 128), jnp.float32), "b": jax.ShapeDtypeStruct((2, 64), jnp.float32)}
    axes = {"w": ("layers", "embed", "mlp"), "b": ("layers", "norm")}
    c = tiny_config()
    c.optim.update(name="adafactor", weight_decay=0.0)
    tx = optim.make_optimizer(c.optim, 10, axes)
    state = jax.eval_shape(tx.init, params)
    got = optim.state_axes(state, params, axes)
    factored = got[1][0]
    assert factored.count == ()
    assert factored.v_row == {"w": ("layers", "mlp"), "b": (None,)}  # rows: the mean over the largest dim
    assert factored.v_col == {"w": ("layers", "embed"), "b": (None,)}
    assert factored.v == {"w": (None,), "b": ("layers", "norm")}
    from parallel.sharding import check_axes

    check_axes(state, got, "adafactor state axes")  # one name per dimension of every leaf


def test_state_axes_refuse_a_leaf_that_mirrors_no_parameter():
    """An optimizer whose state has an array no parameter explains (a GaLore projection, say) needs its own rule."""
    params = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}
    odd = optax.GradientTransformation(lambda p: {"proj": jnp.zeros((8, 2))}, lambda u, s, p=None: (u, s))
    tx = optax.chain(optax.scale_by_adam(), odd)
    with pytest.raises(ValueError, match=r"optimizer state leaf \[1\]\['proj'\] of shape \(8, 2\) mirrors no parameter"):
        optim.state_axes(jax.eval_shape(tx.init, params), params, {"w": ("embed", "mlp")})
