"""Training jobs as subprocesses, for the scripts that run an experiment at several seeds
(``cot_run``, ``switch_run``, ``synthetic_run``): one ``python -m train`` per (config, seed), then optionally one
``python -m train.evaluate``, each logged to ``ROOT/NAME/seedS/log.txt``; ``run_all`` runs several at once,
``define_flags`` declares the flags the scripts share. ``stage`` trains one config in this process, for the
runners whose stages chain (``orpo_run``, ``cai_run``)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(name: str, seed: int, root: str, overrides: list[str], mem_fraction: float,
        eval_task: str | None = None) -> dict:
    """Train (or resume) ``experiments/NAME.py`` at ``seed`` in ``root/NAME/seedS`` with the config
    ``overrides`` (section.key=value), then, with ``eval_task``, evaluate it into ``EVAL_TASK.json``
    there. Returns that JSON (or {}) plus the seconds of each stage and the overrides. A finished
    job is not rerun; one finished with other overrides is refused (ValueError), not reused."""
    workdir = os.path.join(root, name, f"seed{seed}")
    out = os.path.join(workdir, f"{eval_task or 'train'}.json")
    if os.path.exists(out):
        with open(out) as f:
            done = json.load(f)
        if done.get("overrides", list(overrides)) != list(overrides):
            raise ValueError(f"{workdir} holds a finished run with overrides {done['overrides']}, not {list(overrides)}; "
                             f"use another --root or remove it.")
        return done
    os.makedirs(workdir, exist_ok=True)
    flags_ = ["--config", os.path.join(ROOT, "experiments", f"{name}.py"), "--workdir", workdir,
              f"--config.seed={seed}", "--config.train.progress=False", *(f"--config.{o}" for o in overrides)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem_fraction:.2f}"}
    stages = [("train", "train", [])]
    if eval_task:
        stages.append(("eval", "train.evaluate", ["--task", eval_task, "--out", out]))
    result = {}
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        for stage, module, extra in stages:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", module, *flags_, *extra], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"{name} seed {seed}: {stage} failed (exit {done.returncode}); see {log.name}")
            result[f"{stage}_s"] = time.perf_counter() - start
    if eval_task:
        with open(out) as f:
            result = {**json.load(f), **result}
    result["overrides"] = list(overrides)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def stage(c, workdir: str, start: str = "") -> dict:
    """Train ``c`` in ``workdir`` (``trainer.run``: resumes, or returns at once when finished there), from the
    parameters of the run in the workdir ``start`` when given (``train.init_from``); the run's last metrics.
    ValueError naming the workdir when the run stopped before ``train.steps`` (preempted): a rerun resumes it."""
    from train import trainer

    c.train.init_from = start
    last = trainer.run(c, workdir)
    if last.get("step", 0) < c.train.steps:  # (a results.json there may be an earlier, shorter run's)
        raise ValueError(f"the run in {workdir} stopped at step {last.get('step')} of {c.train.steps} "
                         f"(preempted); run the same command again to resume it.")
    return last


def finished_seed(path: str, args: dict) -> dict | None:
    """The results a runner saved for a finished seed at ``path`` (``save_seed``), or None when there are none.
    ValueError when they were made with other ``args`` (the runner's flags): refused, not reused."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("args") != args:
        raise ValueError(f"{path} holds results made with {done.get('args')}, not {args}; use another --root or "
                         f"remove it.")
    return done["results"]


def save_seed(path: str, results: dict, args: dict) -> None:
    """Save a finished seed's ``results`` with the ``args`` that made them (``finished_seed`` reads them)."""
    with open(path, "w") as f:
        json.dump({"args": args, "results": results}, f, indent=1)


def define_flags(root: str, flag_values=None) -> None:
    """--root (default ``root``), --seeds, --parallel, --set: the flags every runner script takes, each
    checked as it is parsed (a bad value is one line under ``train.cli.run``). Called under
    ``if __name__ == "__main__"``, so that importing a runner (tests) defines none."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("root", root, "Directory for the runs and the tables.", flag_values=fv)
    define_seeds("Seeds (config.seed) of every job.", fv)
    flags.DEFINE_integer("parallel", 1, "Jobs at once (they share the accelerator's memory evenly).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_multi_string("set", [], "Config overrides for every job, as section.key=value.", flag_values=fv)


def define_seeds(help: str = "Seeds.", flag_values=None) -> None:
    """--seeds, a list of non-negative integers (default 0,1), checked as it is parsed."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_list("seeds", ["0", "1"], help, flag_values=fv)
    flags.register_validator("seeds", lambda v: bool(v) and all(x.isdigit() for x in v),
                             "--seeds: use non-negative integers, comma-separated, e.g. 0,1.", flag_values=fv)


def define_lrs(name: str, default: list[str], help: str, flag_values=None) -> None:
    """A list flag of learning rates in (0, 1), checked as it is parsed."""
    from absl import flags

    def valid(values):
        try:
            return bool(values) and all(0 < float(x) < 1 for x in values)
        except ValueError:
            return False

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_list(name, default, help, flag_values=fv)
    flags.register_validator(name, valid, f"--{name}: use learning rates in (0, 1), comma-separated, e.g. "
                                          f"{','.join(default)}.", flag_values=fv)


def run_all(jobs: list[tuple[str, int]], root: str, overrides: list[str], parallel: int,
            eval_task: str | None = None) -> dict[tuple[str, int], dict]:
    """``job`` for every (name, seed), ``parallel`` at once, each given 0.9 / parallel of the
    accelerator memory; returns their results by (name, seed). Raises on the first failed job."""
    fraction = 0.9 / max(parallel, 1)
    with concurrent.futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
        futures = {jb: pool.submit(job, *jb, root, overrides, fraction, eval_task=eval_task) for jb in jobs}
        return {jb: f.result() for jb, f in futures.items()}


def cell(values, scale: float = 100.0, digits: int = 1) -> str:
    """'mean [min, max]' of ``values`` times ``scale`` (percent by default)."""
    v = scale * np.asarray(values, float)
    return f"{v.mean():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"
