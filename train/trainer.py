"""The one trainer: every experiment is a config that this loop runs.

    python -m train --config experiments/arith_cot.py --workdir runs/arith_cot [--config.key=value]

Per run: validate the config, take the workdir's lock, build the mesh and shardings, restore the
latest checkpoint (state and data position, verified against its checksums) or initialise, then
loop: jitted train step with donated state, metrics, periodic eval and checkpoints. SIGTERM and
SIGINT save a checkpoint and return cleanly (a second SIGINT aborts).

Records: ``config.json`` is the config of the latest stage (what the latest checkpoint was trained
with; ``train.evaluate`` reads it), and ``config_history.jsonl`` has the first run's whole config
(step 0) and, for every resume that changed it, the step and each changed field's old and new
value, so every stage's config is recoverable. A rerun of a finished run does nothing and keeps
``results.json``; a larger ``train.steps`` continues it.
"""
from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
from absl import logging

from parallel import mesh as mesh_lib
from parallel import sharding
from train import checkpoint, data, evaluate, metrics, optim
from train.config import validate
from train.setup import setup_training


def git_revision() -> str:
    """HEAD of the code's repository, with '+dirty' for uncommitted changes, or 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class WorkdirLockedError(checkpoint.CheckpointError):
    """Another trainer holds the workdir's lock."""


class _Preemption:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step; a second SIGINT aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("%s: saving a checkpoint after this step, then exiting%s.", signal.Signals(signum).name,
                        " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _WorkdirLock:
    """One trainer per workdir: an exclusive ``fcntl.flock`` on ``workdir/.lock`` (holding the owner's pid),
    released by the kernel when its process dies, so a dead trainer's lock is free."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} is in use by another trainer "
                                     f"(process {owner}); wait for it to finish or use another --workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _write_json(path: str, value) -> None:
    """``value`` as JSON at ``path``, written to a temporary file and renamed (never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value, indent=2))
    os.replace(tmp, path)


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# A resume may not change these (the experiment's meaning) unless train.allow_config_change.
PROTECTED = ("data.", "model.", "seed", "train.objective", "optim.name")


def config_changes(recorded: dict, current: dict) -> dict:
    """{field: [old, new]} of every flattened field that differs (None where a side lacks it)."""
    old, new = _flatten(recorded), _flatten(current)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_config_change(config, workdir: str, step: int, recorded: dict | None) -> dict:
    """The changes from the checkpoint's recorded config to ``config``; ValueError naming the fields when a
    protected one (``PROTECTED``) changed and ``train.allow_config_change`` is off."""
    if recorded is None:
        return {}
    changes = config_changes(recorded, _config_dict(config))
    protected = [k for k in changes if k.startswith(PROTECTED[:2]) or k in PROTECTED[2:]]
    if protected and not config.train.allow_config_change:
        shown = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in protected[:4])
        shown = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in protected[:4])
        raise ValueError(f"resuming {workdir} at step {step} would change {shown}{', ...' if len(protected) > 4 else ''}, "
                         f"which changes what the run means (data, model, seed, objective or optimizer): use another "
                         f"--workdir, or pass --config.train.allow_config_change=True to continue anyway.")
    return changes


def _write_run_info(workdir: str, config, step: int, changes: dict, recorded: dict | None) -> None:
    """config.json (this stage's config), config_history.jsonl (first config, then each change) and run_info.json."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    history = os.path.join(workdir, "config_history.jsonl")
    entries = []
    if step == 0 or not os.path.exists(history):
        entries.append({"step": 0, "config": recorded if step and recorded else _config_dict(config)})
        if step == 0 and os.path.exists(history):
            os.remove(history)  # no checkpoint: a fresh run; earlier records describe nothing that survives
    if step and changes:
        entries.append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes})
        logging.warning("resuming at step %d with a changed config (recorded in %s): %s", step, history,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if entries:
        with open(history, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in entries))
    _write_json(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    _write_json(os.path.join(workdir, "run_info.json"), {
        "git_revision": git_revision(), "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "processes": jax.process_count()})


class _Interval:
    """Train throughput over the steps since the last log line; evaluation time is not training time."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.steps = time.perf_counter(), 0

    def exclude(self, seconds: float):
        self.start += seconds


def load_init_params(setup, path: str):
    """The parameters ``train.init_from`` names, checked against this run's model: a workdir's latest verified
    checkpoint (restored with the config the workdir recorded, on this run's mesh) or a ``model.safetensors``
    (train.compress's, with compress.json beside it, or a Hugging Face directory's). Host or device arrays of the
    model's parameter structure, or of this run's adapted structure."""
    from train import compress, workdir_config

    if os.path.isdir(os.path.join(path, "checkpoints")):
        source = workdir_config.load(path)
        source.update(mesh=setup.config.mesh, sharding=setup.config.sharding)
        params = evaluate.load_state(source, path, recorded=True)[1].params
    elif path.endswith(".safetensors") and os.path.isfile(path):
        directory = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(directory, "compress.json")):
            params = compress.load(directory)[2]
        else:
            from models import hf
            params = hf.load_checkpoint(directory)[0]
    else:
        raise FileNotFoundError(f"train.init_from {path!r} is neither a workdir with checkpoints/ nor a "
                                f"model.safetensors file; pass a trained run's workdir or a safetensors file.")
    want = setup.state_shape.params
    if setup.adapt is not None and jax.tree.structure(params) != jax.tree.structure(want):
        want = jax.eval_shape(functools.partial(setup.model.init, setup.mcfg), jax.random.PRNGKey(0))
    got = {sharding.path_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key, w in jax.tree_util.tree_leaves_with_path(want):
        name, g = sharding.path_name(key), got.pop(sharding.path_name(key), None)
        if g is None or (tuple(g.shape), jnp.dtype(g.dtype)) != (tuple(w.shape), jnp.dtype(w.dtype)):
            found = "is missing" if g is None else f"has shape {tuple(g.shape)} {jnp.dtype(g.dtype)}"
            raise ValueError(f"train.init_from {path}: parameter {name} {found} but this run's model needs "
                             f"{tuple(w.shape)} {jnp.dtype(w.dtype)}; set model.* (e.g. n_layers) as in that model.")
    if got:
        raise ValueError(f"train.init_from {path}: parameter {next(iter(got))} is not in this run's model; set "
                         f"model.* as in that model.")
    return params


def restore_or_init(setup, ckpt: checkpoint.Checkpointer, train_iter, seed: int):
    """(state, first step): the latest checkpoint's state and data position (its meta item in ``ckpt.meta``),
    or a fresh state at step 0: from ``train.init_from``'s parameters when set (fresh optimizer state), else
    ``model.init`` (adapters added per ``train.adapters``)."""
    restored = ckpt.restore(setup.abstract_state())
    if restored is not None:
        state, data_state, start = restored
        train_iter.set_state(data_state)
        return state, start
    init_from = setup.config.train.get("init_from", "")
    if init_from:
        params = load_init_params(setup, init_from)
        logging.info("a fresh run from the parameters of %s", init_from)
        return jax.jit(setup.state_from_params, out_shardings=setup.state_shardings)(params), 0
    return jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed)), 0


def log_train(logger, interval: _Interval, step: int, step_metrics, *, schedule, tokens_per_step: int,
              flops_per_token: float, extra: dict | None = None) -> dict:
    """Log the last step's metrics with throughput (tokens/s, step time, MFU) and the learning rate it used."""
    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    elapsed = time.perf_counter() - interval.start
    tokens_per_s = interval.steps * tokens_per_step / elapsed
    record.update(tokens_per_s=tokens_per_s, step_s=elapsed / interval.steps, lr=float(schedule(step - 1)))
    utilisation = metrics.mfu(flops_per_token, tokens_per_s)
    if utilisation is not None:
        record["mfu"] = utilisation
    record.update(extra or {})
    logger.log(step, record)
    interval.reset()
    return record


def run_evals(evaluator, params, step: int, logger, interval: _Interval) -> dict:
    """Every evaluation due at ``step`` (``evaluate.Evaluator.due``), logged; their time left out of ``interval``."""
    t0, results = time.perf_counter(), {}
    for name in evaluator.due(step):
        record = evaluator.run(name, params)
        logger.log(step, record)
        results.update(record)
    interval.exclude(time.perf_counter() - t0)
    return results


class _Watch:
    """Checks each completed step's loss and gradient norm, advances the progress bar, counts skipped steps.

    The loop hands it a step's metrics right after dispatching that step and settles the previous
    step then (the device has the new step queued, so waiting for the previous one's two scalars costs
    the loop nothing); a step is settled at once where something follows it (a log line, an
    evaluation, a save, the end). ``train.nonfinite="stop"`` raises NonFiniteError at the first
    non-finite step, after logging it; "skip" counts the steps the train step left out.
    """

    def __init__(self, logger, mode: str, skipped: int):
        self.logger, self.mode, self.skipped = logger, mode, skipped
        self._pending = None

    def push(self, step: int, step_metrics) -> None:
        self.settle()
        self._pending = (step, step_metrics)

    def settle(self) -> None:
        if self._pending is None:
            return
        step, m = self._pending
        self._pending = None
        values = jax.device_get({k: m[k] for k in ("loss", "grad_norm", "skipped") if k in m})
        self.logger.advance()
        if values.get("skipped", 0.0) > 0:
            self.skipped += 1
            logging.warning("step %d: non-finite loss (%s) or gradient norm (%s); its update was skipped "
                            "(%d skipped so far).", step, values["loss"], values["grad_norm"], self.skipped)
        elif not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])) and self.mode == "stop":
            self.logger.log(step, {k: float(v) for k, v in jax.device_get(m).items()})
            raise checkpoint.NonFiniteError(
                f"step {step} has a non-finite loss ({float(values['loss'])}) or gradient norm "
                f"({float(values['grad_norm'])}); the run stopped without saving it or any later step. Lower optim.lr "
                f"or optim.clip_norm, or set train.nonfinite='skip' to skip such steps.")


def train_loop(setup, state, start: int, next_batch, train_iter, *, workdir: str, ckpt, logger, evaluator,
               stop_after: int | None, preemption, skipped: int = 0) -> tuple[int, dict]:
    """Steps ``start``..``train.steps`` (or until ``stop_after``, SIGTERM or SIGINT): the compiled step on donated
    state, the next batch loaded while the device works, logs, evaluations and checkpoints.
    Returns (last step, last logged values)."""
    t, config = setup.config.train, setup.config
    schedule = optim.make_schedule(config.optim, t.steps)
    row_sets = sum(k.endswith("inputs") for k in setup.objective.batch_keys)  # 2 for chosen and rejected rows
    tokens_per_step = row_sets * t.batch_size * t.seq_len
    flops_per_token = setup.model.flops_per_token(setup.mcfg, t.seq_len)
    recorded = json.loads(config.to_json_best_effort())
    nonfinite = t.nonfinite
    watch = _Watch(logger, nonfinite, skipped)
    last, step = {}, start
    if start >= t.steps:
        return step, last
    batch = next_batch()
    t0 = time.perf_counter()
    compiled = setup.jit_train_step().lower(state, batch).compile()
    logger.log(start, {"compile_s": time.perf_counter() - t0})
    interval, tracing = _Interval(), False
    while step < t.steps:
        if step + 1 == t.profile_steps[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
            tracing = True
        state, step_metrics = compiled(state, batch)
        step += 1
        interval.steps += 1
        data_state = train_iter.get_state()  # position after the batches consumed so far
        stopping = preemption.requested or step == stop_after or step == t.steps
        if not stopping:
            batch = next_batch()  # overlaps with the device step
        watch.push(step, step_metrics)  # settles the previous step
        if step == t.profile_steps[1] and tracing:  # a run resumed inside the window traces nothing
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            tracing = False
        logging_now = step % t.log_every == 0 or stopping
        saving = ckpt.should_save(step) or stopping
        if logging_now or saving or evaluator.due(step):
            watch.settle()
        extra = {"nonfinite_skipped": watch.skipped} if nonfinite == "skip" else None
        if logging_now:
            last.update(log_train(logger, interval, step, step_metrics, schedule=schedule,
                                  tokens_per_step=tokens_per_step, flops_per_token=flops_per_token, extra=extra))
        last.update(run_evals(evaluator, state.params, step, logger, interval))
        if saving:
            ckpt.record.update(config=recorded, nonfinite_skipped=watch.skipped)
            ckpt.save(step, state, data_state, wait=stopping)
        if stopping:
            break
    if tracing:
        jax.profiler.stop_trace()
    return step, last


def _finished(workdir: str, step: int, steps: int) -> dict | None:
    """The results of a run already at or past ``train.steps`` (``step``), or None when there is more to train.
    Writes results.json only when it is missing (a crash after the last checkpoint), from metrics.jsonl."""
    if step < steps:
        return None
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        logging.warning("%s already finished: its checkpoint is at step %d and train.steps is %d, so there is "
                        "nothing to train; results.json is kept as it was. Raise --config.train.steps to continue.",
                        workdir, step, steps)
        return {**results, "already_finished": True}
    results = {}
    for record in metrics.read_jsonl(workdir):
        if record.get("step", 0) <= step:
            results.update({k: v for k, v in record.items() if k != "step"})
    results.update(step=step, preempted=False)
    if jax.process_index() == 0:
        _write_json(path, results)
    logging.warning("%s finished at step %d without results.json (interrupted after its last checkpoint); wrote "
                    "it from metrics.jsonl.", workdir, step)
    return results


def run(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint.

    ``stop_after`` ends this invocation after that global step (as an interruption would),
    leaving a checkpoint to resume from. Returns the final metrics. Raises ValueError (config,
    refused config change, non-finite loss: ``checkpoint.NonFiniteError``), CheckpointError (a
    checkpoint that cannot be restored or fails its checksums; the workdir's lock held by another
    trainer: ``WorkdirLockedError``) or OSError; the checkpoint manager is closed first.
    """
    validate(config)  # before anything touches a device
    t = config.train
    checkpoint.quiet_orbax_logging()
    mesh_lib.initialize_distributed(config.distributed)
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    tokenizer = data.make_tokenizer(config.data)
    train_iter = iter(data.make_dataset(config.data, split="train", seed=config.seed, tokenizer=tokenizer,
                                        seq_len=t.seq_len, batch_size=t.batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count()))
    lock = _WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()
    ckpt = logger = None
    try:
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=t.ckpt_every,
                                       keep=t.ckpt_keep, async_save=t.async_checkpoint)
        state, start = restore_or_init(setup, ckpt, train_iter, config.seed)
        meta = ckpt.meta or {}
        recorded = meta.get("config")
        if start and recorded is None and os.path.exists(os.path.join(workdir, "config.json")):
            with open(os.path.join(workdir, "config.json")) as f:  # a checkpoint from before meta items
                recorded = json.load(f)
        finished = _finished(workdir, start, t.steps)
        if finished is not None:
            ckpt.close()
            return finished
        changes = check_config_change(config, workdir, start, recorded if start else None)
        _write_run_info(workdir, config, start, changes, recorded)
        logger = metrics.MetricsLogger(workdir, total_steps=t.steps, initial_step=start, progress=t.progress)
        evaluator = evaluate.Evaluator(setup, tokenizer)

        def next_batch():
            return sharding.global_batch(next(train_iter), setup.mesh, setup.rules)

        with sharding.activate(setup.mesh, setup.rules), _Preemption() as preemption:
            step, last = train_loop(setup, state, start, next_batch, train_iter, workdir=workdir, ckpt=ckpt,
                                    logger=logger, evaluator=evaluator, stop_after=stop_after,
                                    preemption=preemption, skipped=int(meta.get("nonfinite_skipped", 0)))
        ckpt.close()
        logger.close()
        last.update(step=step, preempted=preemption.requested)
        if jax.process_index() == 0 and step == t.steps:
            _write_json(os.path.join(workdir, "results.json"), last)
    except BaseException:
        _close_quietly(ckpt, logger)
        raise
    finally:
        lock.release()
    return last


def _close_quietly(ckpt, logger) -> None:
    """After a failure: close the checkpoint manager (pending saves, threads, event loop) and the logger
    (its plot marks the non-finite points), so nothing asynchronous fails after the error; their own errors
    are logged, not raised over the first one."""
    checkpoint.quiet_async_noise()
    for close in (ckpt and ckpt.close, logger and logger.close):
        if close:
            try:
                close()
            except Exception as e:  # the original error is the one to report
                logging.warning("while closing after an error: %s: %s", type(e).__name__, e)
