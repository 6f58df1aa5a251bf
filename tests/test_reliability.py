"""Integrity and records: checksummed checkpoints (a corrupted array or data-state file is refused and left
untouched), non-finite losses (stop, or skip and count; never saved), plots that mark non-finite points,
a finished run rerun as a no-op, continuing to more steps, torn metrics lines, one trainer per workdir,
config changes on resume (recorded, refused or allowed), SIGINT, and no asynchronous noise after an error."""
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel import mesh as mesh_lib
from tests.helpers import tiny_train_config
from train import checkpoint, metrics, objective as objective_lib, step as step_lib, trainer
from train.setup import setup_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(str(workdir)) if "loss" in r}


def tree_digest(path, skip=(".lock",)):
    """SHA-256 over every file's relative path and bytes under ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name in skip:
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                h.update(os.path.relpath(full, path).encode() + f.read())
    return h.hexdigest()


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, result) of the tiny default experiment run to its end: 8 steps, checkpoints 4, 6 and 8 kept."""
    path = tmp_path_factory.mktemp("finished")
    return path, trainer.run(tiny_train_config(), str(path))


def abstract_state(config):
    return setup_training(config, mesh_lib.make_mesh(config.mesh)).abstract_state()


# ----------------------------------------------------------------------------- integrity

@pytest.mark.timeout(240)
def test_corrupted_array_file_is_refused_in_every_position_and_left_untouched(finished, tmp_path):
    """16 bytes overwritten inside an array data file, at positions spread over every data file: each trial
    is refused with the step named (a larger train.steps, so an accepted checkpoint would train on) and the
    workdir stays byte for byte as it was."""
    wd = copy_run(finished[0], tmp_path / "wd")
    data_dir = wd / "checkpoints" / "8" / "state" / "ocdbt.process_0" / "d"
    files = sorted(data_dir.iterdir(), key=lambda p: -p.stat().st_size)
    assert len(files) > 3
    rng = random.Random(0)
    trials = [(files[i % len(files)], rng.random()) for i in range(8)]
    for victim, where in trials:
        original = victim.read_bytes()
        pos = int(where * (len(original) - 16))
        victim.write_bytes(original[:pos] + bytes(rng.randrange(256) for _ in range(16)) + original[pos + 16:])
        before = tree_digest(wd)
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/8 \(step 8\) fails its checksum: the file "
                                                             r"state/ocdbt.process_0/d/\w+ differs"):
            trainer.run(tiny_train_config(steps=12), str(wd))
        assert tree_digest(wd) == before, (victim.name, pos)
        victim.write_bytes(original)


@pytest.mark.timeout(240)
def test_array_checksums_catch_changed_values_without_the_file_record(finished, tmp_path):
    """Without files.sha256.json (a checkpoint sealed by nothing), a corrupted data file is refused or, where
    the bytes do not reach the values read, restores bitwise equal arrays: a changed value is never accepted.
    A state that differs from its recorded checksums is refused naming the arrays."""
    config = tiny_train_config()
    abstract = abstract_state(config)
    good = checkpoint.Checkpointer(str(finished[0] / "checkpoints"), every=2, keep=3, read_only=True)
    reference, data_state, _ = good.restore(abstract)
    good.close()
    rng = random.Random(1)
    refused = 0
    for trial in range(6):
        ckdir = tmp_path / f"c{trial}"
        shutil.copytree(finished[0] / "checkpoints" / "8", ckdir / "8")
        os.remove(ckdir / "8" / checkpoint.FILES)
        data_dir = ckdir / "8" / "state" / "ocdbt.process_0" / "d"
        victim = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
        raw = bytearray(victim.read_bytes())
        pos = rng.randrange(len(raw) - 16)
        raw[pos:pos + 16] = bytes(x ^ 0xFF for x in raw[pos:pos + 16])
        victim.write_bytes(bytes(raw))
        ckpt = checkpoint.Checkpointer(str(ckdir), every=2, keep=3)
        try:
            state, _, _ = ckpt.restore(abstract)
        except checkpoint.CheckpointError as e:
            assert "(step 8)" in str(e)
            refused += 1
        else:
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)))
        finally:
            ckpt.close()
    assert refused >= 1
    # the comparison itself: one changed element of one array
    meta = json.loads((finished[0] / "checkpoints" / "8" / "meta" / "metadata").read_text())
    changed = reference.replace(params={**reference.params, "embed": reference.params["embed"].at[3, 5].add(1e-3)})
    with pytest.raises(checkpoint.CheckpointError, match=r"\(step 8\) fails its checksum: 1 array\(s\) \(params/embed\)"):
        checkpoint._verify(changed, data_state, meta, "ck/8", 8)
    checkpoint._verify(reference, data_state, meta, "ck/8", 8)  # the untouched state passes


@pytest.mark.timeout(120)
def test_changed_data_state_file_is_refused(finished, tmp_path):
    abstract = abstract_state(tiny_train_config())
    for sealed in (True, False):
        ckdir = tmp_path / f"sealed{sealed}"
        shutil.copytree(finished[0] / "checkpoints" / "8", ckdir / "8")
        path = ckdir / "8" / "data" / "metadata"
        state = json.loads(path.read_text())
        assert state and isinstance(state, dict)
        path.write_text(json.dumps(_bump_first_number(state)))
        if not sealed:
            os.remove(ckdir / "8" / checkpoint.FILES)
        words = "the file data/metadata differs" if sealed else "the data iterator state differs"
        ckpt = checkpoint.Checkpointer(str(ckdir), every=2, keep=3)
        with pytest.raises(checkpoint.CheckpointError, match=rf"\(step 8\) fails its checksum: {words}"):
            ckpt.restore(abstract)
        ckpt.close()


def _bump_first_number(value):
    """``value`` (JSON) with its first integer leaf + 1."""
    done = [False]

    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool) and not done[0]:
            done[0] = True
            return v + 1
        return v

    out = walk(value)
    assert done[0], value
    return out


# ----------------------------------------------------------------------------- non-finite steps

def poisoned_objective(at: int, seed: int = 0):
    """The LM objective with a NaN loss (and so NaN gradients) at the step whose state.step is ``at``
    (logged as step at + 1): recognised by its train-mode key ``step_rng(seed, at)``."""
    def make(train_cfg):
        base = objective_lib.lm_objective(train_cfg)

        def loss(model, mcfg, params, batch, *, train=False, rng=None):
            out = base.loss(model, mcfg, params, batch, train=train, rng=rng)
            if rng is None:
                return out
            hit = jnp.all(jax.random.key_data(rng) == jax.random.key_data(step_lib.step_rng(seed, at)))
            nan = jnp.where(hit, jnp.nan, 1.0)
            return out._replace(total=out.total * nan, sums={k: v * nan for k, v in out.sums.items()})

        return objective_lib.Objective("poisoned", base.batch_keys, base.logs, base.weight_name, loss)

    return make


@pytest.mark.timeout(240)
def test_nonfinite_loss_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
    """train.nonfinite='stop' (the default): NaN at step 5 stops the run with one message naming the step;
    retention (ckpt_keep=1) keeps step 4's finite checkpoint; nothing of step 5 or later is saved; no
    results.json; the plot marks the NaN point."""
    monkeypatch.setitem(objective_lib.OBJECTIVES, "poisoned", poisoned_objective(4))
    c = tiny_train_config(objective="poisoned", ckpt_keep=1)
    with pytest.raises(checkpoint.NonFiniteError, match=r"step 5 has a non-finite loss \(nan\)"):
        trainer.run(c, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=2, keep=1)
    assert ckpt._manager.all_steps() == [4]
    state, _, _ = ckpt.restore(abstract_state(c))
    ckpt.close()
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact))
    assert not (tmp_path / "results.json").exists()
    recorded = losses(tmp_path)
    assert sorted(recorded) == [1, 2, 3, 4, 5] and np.isnan(recorded[5])
    fig = metrics.loss_figure(metrics.read_jsonl(str(tmp_path)))
    marked = [line for line in fig.axes[0].get_lines() if "non-finite" in str(line.get_label())]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [5]
    assert (tmp_path / "loss.png").exists()
    # a state holding a NaN is refused by the checkpointer itself
    ckpt = checkpoint.Checkpointer(str(tmp_path / "other"), every=1, keep=1)
    bad = state.replace(params={**state.params, "embed": state.params["embed"].at[0, 0].set(jnp.inf)})
    with pytest.raises(checkpoint.NonFiniteError, match=r"step 9 holds non-finite values \(params/embed\)"):
        ckpt.save(9, bad, {}, wait=True)
    ckpt.close()
    assert not os.listdir(tmp_path / "other")


@pytest.mark.timeout(240)
def test_nonfinite_skip_leaves_the_update_out_and_counts_it(tmp_path, monkeypatch):
    """train.nonfinite='skip': step 5's update is skipped (its checkpoint's parameters and optimizer state equal
    step 4's), counted, carried over a resume into results.json; the program under 'stop' has no select."""
    monkeypatch.setitem(objective_lib.OBJECTIVES, "poisoned", poisoned_objective(4))
    c = tiny_train_config(objective="poisoned", nonfinite="skip", ckpt_every=1, ckpt_keep=10)
    first = trainer.run(c, str(tmp_path), stop_after=5)
    assert first["skipped"] == 1.0 and first["nonfinite_skipped"] == 1
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=10, read_only=True)
    at4 = ckpt._manager.restore(4, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardRestore(
        abstract_state(c))))
    state5, _, step = ckpt.restore(abstract_state(c))
    ckpt.close()
    assert step == 5 and int(state5.step) == 5
    for a, b in zip(jax.tree.leaves((state5.params, state5.opt_state)),
                    jax.tree.leaves((at4.state.params, at4.state.opt_state))):
        assert np.array_equal(a, b)
    result = trainer.run(c, str(tmp_path))
    assert result["step"] == 8 and result["nonfinite_skipped"] == 1 and np.isfinite(result["loss"])
    assert json.loads((tmp_path / "results.json").read_text())["nonfinite_skipped"] == 1

    setup = setup_training(tiny_train_config(), mesh_lib.make_mesh(c.mesh))
    batch = setup.abstract_batch()
    stop = str(jax.make_jaxpr(setup.train_step)(setup.state_shape, batch))
    skip_setup = setup_training(tiny_train_config(nonfinite="skip"), mesh_lib.make_mesh(c.mesh))
    skip = str(jax.make_jaxpr(skip_setup.train_step)(setup.state_shape, batch))
    assert skip.count("select_n") > stop.count("select_n")  # the select exists only under "skip"
    assert "skipped" not in jax.eval_shape(setup.train_step, setup.state_shape, batch)[1]


def test_plots_mark_nonfinite_points(tmp_path):
    records = [{"step": s, "loss": v, "moe/load/layer0": v} for s, v in
               [(1, 3.0), (2, float("nan")), (3, 2.0), (4, float("inf"))]]
    fig = metrics.loss_figure(records)
    lines = {str(line.get_label()): line for line in fig.axes[0].get_lines()}
    assert list(lines["loss"].get_xdata()) == [1, 3]
    assert list(lines["loss: non-finite (2)"].get_xdata()) == [2, 4]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    assert metrics.plot_losses(str(tmp_path)) and metrics.plot_layer_metrics(str(tmp_path))


# ----------------------------------------------------------------------------- records

@pytest.mark.timeout(120)
def test_rerun_of_a_finished_run_is_a_noop(finished, caplog):
    path, result = finished
    before = tree_digest(path)
    with caplog.at_level(logging.WARNING):
        again = trainer.run(tiny_train_config(), str(path))
    assert tree_digest(path) == before  # results.json, metrics, plots, config: nothing rewritten
    assert again["already_finished"] and again["loss"] == result["loss"] and again["step"] == 8
    assert "already finished" in caplog.text and "results.json is kept" in caplog.text


@pytest.mark.timeout(240)
def test_continuing_to_more_steps_repairs_a_torn_line_and_records_the_config_change(finished, tmp_path, caplog):
    """A finished run continued to train.steps=10 with another learning rate and (allowed) another data.max_steps:
    the torn last metrics line (a crash mid-write) is cut off at the start, the run trains steps 9-10 and updates
    results.json; config_history.jsonl keeps the first config and records each change; config.json is the
    latest stage's."""
    wd = copy_run(finished[0], tmp_path / "wd")
    with open(wd / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "loss": 1.2')
    with caplog.at_level(logging.WARNING):
        assert sorted(losses(wd)) == list(range(1, 9))  # read_jsonl skips the torn line, naming it
    assert f"{wd / 'metrics.jsonl'} line 17 is not a JSON record" in caplog.text or "is not a JSON record" in caplog.text
    c = tiny_train_config(steps=10, allow_config_change=True)
    c.optim.lr = 1e-3
    c.data.max_steps = 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = trainer.run(c, str(wd))
    assert "removed a torn last line" in caplog.text
    for line in (wd / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole
    assert sorted(losses(wd)) == list(range(1, 11))
    assert result["step"] == 10 and json.loads((wd / "results.json").read_text())["step"] == 10
    history = [json.loads(line) for line in (wd / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 0 and history[0]["config"]["train"]["steps"] == 8
    assert history[-1]["step"] == 8 and history[-1]["changes"]["train.steps"] == [8, 10]
    assert history[-1]["changes"]["optim.lr"] == [3e-3, 1e-3] and history[-1]["changes"]["data.max_steps"] == [3, 4]
    assert json.loads((wd / "config.json").read_text())["train"]["steps"] == 10


@pytest.mark.timeout(120)
def test_changed_data_model_or_seed_on_resume_is_refused_naming_the_fields(finished, tmp_path):
    wd = copy_run(finished[0], tmp_path / "wd")
    before = tree_digest(wd)
    for section, field, value, words in [(None, "seed", 1, "seed 0 -> 1"),
                                         ("data", "max_steps", 5, "data.max_steps 3 -> 5"),
                                         ("model", "rope_theta", 500.0, "model.rope_theta 10000.0 -> 500.0")]:
        c = tiny_train_config(steps=10)
        if section:
            c[section][field] = value
        else:
            c[field] = value
        with pytest.raises(ValueError, match=rf"resuming .* at step 8 would change {words}.*allow_config_change=True"):
            trainer.run(c, str(wd))
        assert tree_digest(wd) == before


def test_read_jsonl_skips_a_bad_line_naming_file_and_line(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in metrics.read_jsonl(str(tmp_path))] == [1, 3]
    assert f"{tmp_path / 'metrics.jsonl'} line 2 is not a JSON record" in caplog.text
    assert metrics.repair_jsonl(str(tmp_path / "metrics.jsonl")) == 0  # a bad middle line is not a torn end
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\x00\x00\n")  # a whole last line of garbage: dropped
    assert metrics.repair_jsonl(str(tmp_path / "metrics.jsonl")) == 4


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_second_trainer_on_a_workdir_is_refused_and_a_dead_owner_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(trainer.WorkdirLockedError,
                           match=rf"workdir {tmp_path} is in use by another trainer \(process {holder.pid}\); wait"):
            trainer.run(tiny_train_config(), str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    lock = trainer._WorkdirLock(str(tmp_path))  # the dead process's lock is free
    lock.acquire()
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(trainer.WorkdirLockedError, match=rf"\(process {os.getpid()}\)"):
        trainer._WorkdirLock(str(tmp_path)).acquire()  # and held against the next one
    lock.release()


def test_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup
    with trainer._Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert p.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- subprocesses: SIGINT, shutdown noise

def cli_overrides(config):
    """``--config.a.b=v`` for each field where ``config`` differs from experiments/arith_cot.py's."""
    from experiments import arith_cot

    base = trainer._flatten(trainer._config_dict(arith_cot.get_config()))
    return [f"--config.{k}={v}" for k, v in trainer._flatten(trainer._config_dict(config)).items() if base.get(k) != v]


@pytest.mark.timeout(300)
def test_sigint_saves_exits_0_and_resumes_with_bitwise_equal_losses(tmp_path):
    c = tiny_train_config(steps=100, ckpt_every=20)
    cmd = [sys.executable, "-m", "train", "--config", "experiments/arith_cot.py", "--workdir", str(tmp_path / "int"),
           *cli_overrides(c)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while not (tmp_path / "int" / "checkpoints" / "20").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT: saving a checkpoint after this step" in out
    interrupted = max(losses(tmp_path / "int"))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "int" / "checkpoints"), every=20, keep=3, read_only=True)
    assert ckpt.latest_step() == interrupted and 20 <= interrupted < 100
    ckpt.close()
    assert not (tmp_path / "int" / "results.json").exists()
    trainer.run(c, str(tmp_path / "int"))
    trainer.run(c, str(tmp_path / "straight"))
    assert sorted(losses(tmp_path / "int")) == list(range(1, 101))
    assert losses(tmp_path / "int") == losses(tmp_path / "straight")  # bitwise


NOISE_SCRIPT = """
import os, shutil, sys
from tests.helpers import tiny_train_config
from train import checkpoint, trainer
workdir = sys.argv[1]
real_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)  # an asynchronous save under way
    if step == 4:
        raise OSError(28, "No space left on device")
checkpoint.Checkpointer.save = save
try:
    trainer.run(tiny_train_config(), workdir)
except OSError as e:
    print("first:", e, file=sys.stderr)
checkpoint.Checkpointer.save = real_save
victim = os.path.join(workdir, "checkpoints", "4", "state", "manifest.ocdbt")
os.remove(os.path.join(workdir, "checkpoints", "4", checkpoint.FILES))
with open(victim, "r+b") as f:
    f.write(b"garbage garbage garbage")
trainer.run(tiny_train_config(), workdir)  # raises CheckpointError: the interpreter exits with it
"""


@pytest.mark.timeout(300)
def test_no_asynchronous_noise_after_a_save_error_or_a_checkpoint_error(tmp_path):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(NOISE_SCRIPT), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 1, out.stderr
    assert "first: [Errno 28] No space left on device" in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.checkpoint.CheckpointError: checkpoint ") and "(step 4)" in last, out.stderr
    for noise in ("Event loop is closed", "sys.meta_path is None", "Exception ignored", "never retrieved",
                  "never awaited"):
        assert noise not in out.stderr, out.stderr
    # one traceback: the CheckpointError's own chain (its causes), nothing else
    assert out.stderr.count("Traceback (most recent call last)") == out.stderr.count("direct cause") + 1, out.stderr


def test_nonfinite_mode_is_validated_before_anything_runs():
    from train.config import validate

    with pytest.raises(ValueError, match=r"train.nonfinite is 'maybe'; use 'stop' .* or 'skip'"):
        validate(tiny_train_config(nonfinite="maybe"))
    validate(tiny_train_config(nonfinite="skip"))
