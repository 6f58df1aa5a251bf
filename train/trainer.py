"""The one trainer: every experiment is a config that this loop runs.

    python -m train --config experiments/arith_cot.py --workdir runs/arith_cot [--config.key=value]

Per run: validate the config, build the mesh and shardings, restore the latest checkpoint
(state and data position) or initialise, then loop: jitted train step with donated state,
metrics, periodic eval and checkpoints. SIGTERM saves a checkpoint and returns cleanly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax

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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _write_run_info(workdir: str, config) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump({"git_revision": git_revision(), "jax": jax.__version__,
                   "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
                   "processes": jax.process_count()}, f, indent=2)


class _Interval:
    """Train throughput over the steps since the last log line; evaluation time is not training time."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.steps = time.perf_counter(), 0

    def exclude(self, seconds: float):
        self.start += seconds


def restore_or_init(setup, ckpt: checkpoint.Checkpointer, train_iter, seed: int):
    """(state, first step): the latest checkpoint's state and data position, or a fresh state at step 0."""
    restored = ckpt.restore(setup.abstract_state())
    if restored is not None:
        state, data_state, start = restored
        train_iter.set_state(data_state)
        return state, start
    return jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed)), 0


def log_train(logger, interval: _Interval, step: int, step_metrics, *, schedule, tokens_per_step: int,
              flops_per_token: float) -> dict:
    """Log the last step's metrics with throughput (tokens/s, step time, MFU) and the learning rate it used."""
    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    elapsed = time.perf_counter() - interval.start
    tokens_per_s = interval.steps * tokens_per_step / elapsed
    record.update(tokens_per_s=tokens_per_s, step_s=elapsed / interval.steps, lr=float(schedule(step - 1)))
    utilisation = metrics.mfu(flops_per_token, tokens_per_s)
    if utilisation is not None:
        record["mfu"] = utilisation
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


def train_loop(setup, state, start: int, next_batch, train_iter, *, workdir: str, ckpt, logger, evaluator,
               stop_after: int | None, preemption) -> tuple[int, dict]:
    """Steps ``start``..``train.steps`` (or until ``stop_after`` or SIGTERM): the compiled step on donated
    state, the next batch loaded while the device works, logs, evaluations and checkpoints.
    Returns (last step, last logged values)."""
    t, config = setup.config.train, setup.config
    schedule = optim.make_schedule(config.optim, t.steps)
    row_sets = sum(k.endswith("inputs") for k in setup.objective.batch_keys)  # 2 for chosen and rejected rows
    tokens_per_step = row_sets * t.batch_size * t.seq_len
    flops_per_token = setup.model.flops_per_token(setup.mcfg, t.seq_len)
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
        logger.advance()
        if step == t.profile_steps[1] and tracing:  # a run resumed inside the window traces nothing
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            tracing = False
        if step % t.log_every == 0 or stopping:
            last.update(log_train(logger, interval, step, step_metrics, schedule=schedule,
                                  tokens_per_step=tokens_per_step, flops_per_token=flops_per_token))
        last.update(run_evals(evaluator, state.params, step, logger, interval))
        if ckpt.should_save(step) or stopping:
            ckpt.save(step, state, data_state, wait=stopping)
        if stopping:
            break
    if tracing:
        jax.profiler.stop_trace()
    return step, last


def run(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint.

    ``stop_after`` ends this invocation after that global step (as an interruption would),
    leaving a checkpoint to resume from. Returns the final metrics.
    """
    validate(config)  # before anything touches a device
    mesh_lib.initialize_distributed(config.distributed)
    t = config.train
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    tokenizer = data.make_tokenizer(config.data)
    train_iter = iter(data.make_dataset(config.data, split="train", seed=config.seed, tokenizer=tokenizer,
                                        seq_len=t.seq_len, batch_size=t.batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count()))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=t.ckpt_every, keep=t.ckpt_keep,
                                   async_save=t.async_checkpoint)
    try:
        state, start = restore_or_init(setup, ckpt, train_iter, config.seed)
    except checkpoint.CheckpointError:
        ckpt.close()
        raise
    _write_run_info(workdir, config)
    logger = metrics.MetricsLogger(workdir, total_steps=t.steps, initial_step=start, progress=t.progress)
    evaluator = evaluate.Evaluator(setup, tokenizer)

    def next_batch():
        return sharding.global_batch(next(train_iter), setup.mesh, setup.rules)

    with sharding.activate(setup.mesh, setup.rules), _Preemption() as preemption:
        step, last = train_loop(setup, state, start, next_batch, train_iter, workdir=workdir, ckpt=ckpt,
                                logger=logger, evaluator=evaluator, stop_after=stop_after, preemption=preemption)
    ckpt.close()
    logger.close()
    last.update(step=step, preempted=preemption.requested)
    if jax.process_index() == 0 and step == t.steps:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(last, f, indent=2)
    return last
