"""The trainer: smoke run of the default experiment, exact resume, SIGTERM, crash during a save,
corrupt checkpoints, config validation, and gradient accumulation."""
import hashlib
import json
import os
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
import pytest

import models
from experiments import arith_cot
from train import checkpoint, metrics, step as step_lib, trainer
from train.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
    c = arith_cot.get_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32")
    c.data.max_steps = 3
    c.train.update({**dict(steps=8, batch_size=8, seq_len=64, log_every=1, eval_every=0, exact_match_every=0,
                           ckpt_every=2, progress=False), **train})
    c.optim.warmup_steps = 2
    return c


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir) if "loss" in r}


@pytest.mark.timeout(240)
def test_default_experiment_smoke(tmp_path):
    c = tiny_config(steps=6, eval_every=6, exact_match_every=6, exact_match_n=2, exact_match_steps=(1, 2),
                    max_new_tokens=40, profile_steps=(2, 4))
    result = trainer.run(c, str(tmp_path))
    for name in ("metrics.jsonl", "loss.png", "config.json", "run_info.json", "results.json"):
        assert (tmp_path / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
    assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(tmp_path / "profile") for f in fs)
    assert json.loads((tmp_path / "run_info.json").read_text())["git_revision"]
    recorded = losses(str(tmp_path))
    assert sorted(recorded) == list(range(1, 7)) and recorded[6] < recorded[1]
    assert 0 <= result["exact_match/1"] <= 1 and "eval_loss" in result and result["tokens_per_s"] > 0


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
def test_interrupted_and_resumed_run_has_bitwise_equal_losses(tmp_path):
    c = tiny_config()
    trainer.run(c, str(tmp_path / "straight"))
    trainer.run(c, str(tmp_path / "resumed"), stop_after=3)  # mid-interval: saved on stop
    trainer.run(c, str(tmp_path / "resumed"), stop_after=6)
    trainer.run(c, str(tmp_path / "resumed"))
    straight, resumed = losses(str(tmp_path / "straight")), losses(str(tmp_path / "resumed"))
    assert sorted(resumed) == list(range(1, 9))
    assert straight == resumed  # bitwise: same floats at every step


def _spawn(code: str, workdir, env_extra=None):
    env = {**os.environ, **(env_extra or {})}  # same 8 CPU devices as this process (conftest)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


TRAIN_SCRIPT = """
    import sys
    from tests.test_trainer import tiny_config
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
def test_run_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path):
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
    trainer.run(tiny_config(), str(tmp_path))
    trainer.run(tiny_config(), str(tmp_path / "straight"))
    resumed, straight = losses(str(tmp_path)), losses(str(tmp_path / "straight"))
    assert all(resumed[s] == straight[s] for s in range(3, 9))


def _tree_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.mark.timeout(240)
def test_incompatible_checkpoint_is_reported_and_left_untouched(tmp_path):
    trainer.run(tiny_config(steps=2), str(tmp_path))
    before = _tree_digest(tmp_path / "checkpoints")
    other = tiny_config(steps=4)
    other.model.d_model = 48
    with pytest.raises(checkpoint.CheckpointError, match="left untouched"):
        trainer.run(other, str(tmp_path))
    assert _tree_digest(tmp_path / "checkpoints") == before


@pytest.mark.timeout(240)
def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
    trainer.run(tiny_config(steps=2), str(tmp_path))
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    victims = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs if f != "commit_success.txt"]
    assert len(victims) > 3
    for victim in victims:  # every array and metadata file of the state becomes garbage
        with open(victim, "wb") as f:
            f.write(b"\x00garbage")
    before = _tree_digest(tmp_path / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="left untouched"):
        trainer.run(tiny_config(steps=4), str(tmp_path))
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
])
def test_invalid_config_fails_before_compiling_naming_the_field(section, field, value, words):
    c = tiny_config()
    c[section][field] = value
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        validate(c)


@pytest.mark.timeout(120)
def test_gradient_accumulation_equals_full_batch():
    c = tiny_config()
    model = models.get("transformer")
    mcfg = model.from_config(c.model)
    tx = step_lib.make_optimizer(c.optim, 10, model.param_axes(mcfg))
    state = step_lib.init_state(model, mcfg, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(3, 200, (4, 16)), "targets": rng.integers(3, 200, (4, 16)),
             "segment_ids": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16), (4, 1)),
             "loss_mask": (rng.random((4, 16)) < 0.7).astype(np.int32)}
    batch = jax.tree.map(jnp.asarray, batch)
    full, m_full = jax.jit(step_lib.make_train_step(model, mcfg, tx))(state, batch)
    accum, m_accum = jax.jit(step_lib.make_train_step(model, mcfg, tx, accum_steps=2))(state, batch)
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-6)
    chex.assert_trees_all_close(full.params, accum.params, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_chunked_cross_entropy_equals_whole_sequence():
    model = models.get("transformer")
    mcfg = model.from_config(tiny_config().model)
    params = model.init(mcfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, mcfg.d_model)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, mcfg.vocab_size, (2, 16)))
    mask = jnp.asarray(rng.random((2, 16)) < 0.8, jnp.float32)

    def loss(p, chunk):
        return step_lib.token_nll(model, mcfg, p, x, targets, mask, chunk)

    logits = np.asarray(model.head(params, x, mcfg), np.float64)  # float64 reference of the formula
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ref = -(np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(mask)).sum()
    np.testing.assert_allclose(loss(params, 0), ref, rtol=1e-6)
    np.testing.assert_allclose(loss(params, 4), ref, rtol=1e-6)
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
    tx = step_lib.make_optimizer(c.optim, 10, model.param_axes(mcfg))
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
