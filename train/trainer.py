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
from train import checkpoint, data, evaluate, metrics, step as step_lib
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


def run(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint.

    ``stop_after`` ends this invocation after that global step (as an interruption would),
    leaving a checkpoint to resume from. Returns the final metrics.
    """
    validate(config)  # before anything touches a device
    mesh_lib.initialize_distributed(config.distributed)
    t = config.train
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    model, mcfg, mesh, rules = setup.model, setup.mcfg, setup.mesh, setup.rules
    state_sh, batch_sh = setup.state_shardings, setup.batch_sharding
    tokenizer = data.make_tokenizer(config.data)
    schedule = step_lib.make_schedule(config.optim, t.steps)
    rng = jax.random.PRNGKey(config.seed)

    ds_kwargs = dict(tokenizer=tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
                     process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(data.make_dataset(config.data, split="train", seed=config.seed, **ds_kwargs))

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=t.ckpt_every, keep=t.ckpt_keep,
                                   async_save=t.async_checkpoint)
    restored = ckpt.restore(setup.abstract_state())
    if restored is not None:
        state, data_state, start = restored
        train_iter.set_state(data_state)
    else:
        state = jax.jit(setup.init_fn, out_shardings=state_sh)(rng)
        start = 0
    _write_run_info(workdir, config)

    eval_step = jax.jit(step_lib.make_eval_step(model, mcfg, objective=t.objective),
                        in_shardings=(state_sh.params, batch_sh))

    def next_batch():
        return sharding.global_batch(next(train_iter), mesh, rules)

    logger = metrics.MetricsLogger(workdir, total_steps=t.steps, initial_step=start, progress=t.progress)
    flops_per_token = model.flops_per_token(mcfg, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    last = {}
    with sharding.activate(mesh, rules), _Preemption() as preemption:
        batch = next_batch() if start < t.steps else None
        compiled = None
        if batch is not None:
            t0 = time.perf_counter()
            compiled = setup.jit_train_step().lower(state, batch).compile()
            logger.log(start, {"compile_s": time.perf_counter() - t0})
        interval_start, interval_steps = time.perf_counter(), 0
        step = start
        while step < t.steps:
            if step + 1 == t.profile_steps[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, step_metrics = compiled(state, batch)
            step += 1
            interval_steps += 1
            data_state = train_iter.get_state()  # position after the batches consumed so far
            stopping = preemption.requested or step == stop_after or step == t.steps
            if not stopping:
                batch = next_batch()  # overlaps with the device step
            logger.advance()
            if step == t.profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            if step % t.log_every == 0 or stopping:
                record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * tokens_per_step / elapsed
                record.update(tokens_per_s=tokens_per_s, step_s=elapsed / interval_steps,
                              lr=float(schedule(step - 1)))  # the rate this step used
                utilisation = metrics.mfu(flops_per_token, tokens_per_s)
                if utilisation is not None:
                    record["mfu"] = utilisation
                logger.log(step, record)
                last.update(record)
                interval_start, interval_steps = time.perf_counter(), 0
            eval_start = time.perf_counter()
            if (t.eval_every and step % t.eval_every == 0) or (step == t.steps and t.eval_every):
                record = evaluate.eval_metrics(eval_step, state.params, config, mesh, rules,
                                               max_batches=t.eval_batches, **ds_kwargs)
                logger.log(step, record)
                last.update(record)
            if t.exact_match_every and (step % t.exact_match_every == 0 or step == t.steps):
                record = evaluate.arithmetic_exact_match(model, mcfg, state.params, tokenizer, config)
                logger.log(step, record)
                last.update(record)
            interval_start += time.perf_counter() - eval_start  # evaluation is not training time
            if ckpt.should_save(step) or stopping:
                ckpt.save(step, state, data_state, wait=stopping)
            if stopping:
                break
    ckpt.close()
    logger.close()
    last.update(step=step, preempted=preemption.requested)
    if jax.process_index() == 0 and step == t.steps:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(last, f, indent=2)
    return last

