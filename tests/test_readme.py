"""README.md's commands work as a new user runs them.

Every command of the README's ```bash blocks is either executed here, in a copy of the repository
(its tracked and untracked, not ignored, files: a fresh clone) with a scratch ``runs/``, or listed in
``CHECKED`` with the reason it is not run; those are checked without running: the module exists,
its absl flags parse, every config field named exists and the config validates, installs name an
existing extra, scripts parse. Training commands run as written with a few size overrides appended
(``TIME``: model, batch, evaluation sizes, never the steps or the cadences), and the evaluation
commands read the workdir the first one trained. The ```python blocks must parse, and every
``module.attr`` (and ``M.attr`` of every model family, ``c.section`` of the base config) they name
must exist, called with arguments its signature accepts.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def norm(command: str) -> str:
    """One command as its shell words, comments and line continuations dropped."""
    return " ".join(shlex.split(command.replace("\\\n", " "), comments=True))


def code_blocks(lang: str) -> list[str]:
    with open(README) as f:
        text = f.read()
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if m.group(1) == lang]


def bash_commands() -> list[str]:
    out = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if norm(line):
                out.append(norm(line))
    return out


# Appended to the training commands that run here: sizes only, so that each finishes in seconds on
# 2 CPU cores. The steps and every cadence (evaluations, checkpoints, warmup) stay as the command
# and its config give them.
TIME = ["--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
        "--config.model.d_ff=64", "--config.train.batch_size=4", "--config.train.eval_batches=1",
        "--config.train.exact_match_n=2", "--config.train.exact_match_steps=(1,2)",
        "--config.train.max_new_tokens=48"]

TRAIN = norm("python -m train --config experiments/arith_cot.py --workdir runs/arith_cot")
SHORT = norm("python -m train --config experiments/arith_cot.py --workdir runs/x "
             "--config.train.steps=100 --config.model.d_model=64")
EVAL_EM = norm("python -m train.evaluate --workdir runs/arith_cot --task exact_match")
EVAL_PPL = norm("python -m train.evaluate --workdir runs/arith_cot --task perplexity --data notes.txt")

# Executed: the command and what is appended to it.
EXECUTED = {
    TRAIN: TIME + ["--config.model.d_model=32"],
    SHORT: TIME,  # its own d_model=64 and steps=100 stay
    EVAL_EM: [],  # as written: the workdir's config.json gives the tiny model
    EVAL_PPL: [],  # notes.txt: a text file of the user's, written by the test
}

GPU = "needs a GPU: a 1.26B-parameter model, hours on a CPU"
# Not executed, with the reason; each is checked without running it.
CHECKED = {norm(c): reason for c, reason in [
    ('pip install -e ".[test]" && python -m pytest',
     "installs packages and runs the whole suite (minutes); checked: the extra exists, pytest imports"),
    ('pip install -e ".[notebook]" && jupyter lab experiments/notebooks/quickstart.ipynb',
     "installs packages and starts a server; checked: the extra exists, the notebook is a notebook "
     "(tests/test_notebook.py executes it)"),
    ("python -m train.bench --config experiments/bench_llama_1b.py --steps 10", GPU),
    ('python -m train.bench --config experiments/bench_llama_1b.py --variants "fp32:;bf16:model.param_dtype=bfloat16"',
     GPU),
    ("python -m train.bench --config experiments/bench_llama_1b.py --decode_batches=1,64 --decode_profile /tmp/trace",
     GPU),
    ("DECODE_BATCHES=1,64 HF_CACHES=static bash experiments/bench_h200.sh OUT decode hfgen",
     "an H200 job script (GPU, prebuilt wheels, the peer scripts); checked: it parses and has the variants"),
    ("bash experiments/bench_h200.sh OUT mambapeer",
     "an H200 job script (GPU, the official Mamba's checkouts and CUDA build); checked: it parses and has the variant"),
    ('pip install -e ".[aot]"', "installs the TPU compiler; checked: the extra exists"),
    ("python -m train.aot --config experiments/bench_llama_1b.py --topology v5e:4x4 --config.mesh.data=1 "
     "--config.mesh.fsdp=8 --config.mesh.tensor=2",
     "a TPU compiler run of a 1.26B model for 16 chips (minutes)"),
    ("python -m experiments.switch_run --root runs/switch_cpu --parallel 2 --set model.d_model=128 "
     "--set model.n_layers=4 --set model.n_heads=4 --set model.n_kv_heads=4 --set model.d_ff=384 "
     "--set model.dtype=float32 --set train.batch_size=16 --set train.seq_len=128 --set train.steps=1200 "
     "--set train.eval_every=100 --set train.eval_batches=8 --set train.ckpt_every=600 --set optim.warmup_steps=100",
     "four runs of 1200 steps (about an hour on 2 cores)"),
    ("export JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$RANK",
     "needs a multi-host cluster; checked: the names are those parallel/mesh.py reads"),
    ("python -m train --config experiments/NAME.py --workdir /shared/runs/NAME --config.mesh.fsdp=8",
     "one process of a multi-host run (a template: NAME is checked as arith_cot)"),
    ("python -m train --config experiments/arith_cot.py --workdir runs/pipe --config.mesh.stage=2 "
     "--config.pipeline.microbatches=4", "needs 2 devices (tests/test_pipeline.py runs the pipeline on 8 CPU devices)"),
    ("python -m train --config experiments/transformer_induction.py --workdir runs/ind256",
     "4000 steps (minutes on a GPU; tests/test_experiments.py trains this config a few steps)"),
    ("python -m train --config experiments/ring_induction.py:2k --workdir runs/ind2k "
     "--config.train.init_from=runs/ind256", "2048-token rows, a stage of the GPU curriculum"),
    ("python -m train --config experiments/ring_induction.py:8k --workdir runs/ind8k "
     "--config.train.init_from=runs/ind2k", "8192-token rows, a stage of the GPU curriculum"),
    ("python -m train --config experiments/ring_induction.py --workdir runs/ring_induction "
     "--config.train.init_from=runs/ind8k", "needs 8 devices and 32768-token sequences (a GPU host)"),
    ("STEPS=5 WARMUP=2 bash experiments/bench_multi_gpu.sh OUT scaling pipeline ring expert multiprocess",
     "a multi-GPU job script; checked: it parses, has the sections and reads the variables"),
    ("python -m train.ppo --config experiments/cai_ppo.py --workdir runs/cai_ppo",
     "PPO iterations of sampling and updates (tests/test_cai.py runs one step of a tiny model)"),
    ("python -m train.compress --workdir runs/arith_cot --config experiments/arith_cot.py --method awq --bits 4 "
     "--group 128 --out runs/arith_cot/awq4",
     "AWQ's searches on the trained workdir (tests/test_awq.py and test_prune.py run the command's code)"),
    ("python -m experiments.cot_run --root runs/cot --seeds 0,1 --parallel 2",
     "six runs and their evaluations (67 minutes on 2 cores)"),
    ("python -m experiments.cot_run --root runs/cot_gpu --seeds 0,1 --parallel 6 --set model.d_model=256 "
     "--set model.n_layers=6 --set model.n_heads=8 --set model.n_kv_heads=8 --set model.d_ff=768 "
     "--set train.steps=1000 --set train.batch_size=64 --set train.eval_every=500 --set train.ckpt_every=500",
     "the GPU budget: six 5.2M-parameter runs (minutes on an H200)"),
]}
PLACEHOLDERS = {"experiments/NAME.py": "experiments/arith_cot.py"}


def user_env() -> dict:
    """The environment of a user's shell: none of the suite's JAX settings (8 virtual devices, CPU
    only) or import paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository's files as a clone has them (no runs/, no caches)."""
    dest = tmp_path_factory.mktemp("clone")
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info"))
    else:
        for rel in filter(None, listed):
            src = os.path.join(ROOT, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


def run(command: str, cwd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    argv = shlex.split(command) + EXECUTED[command]
    assert argv[0] == "python"
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"README command failed ({proc.returncode}): {shlex.join(argv)}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_every_command_is_executed_or_checked():
    commands = bash_commands()
    assert len(commands) == len(set(commands)), "a README command appears twice"
    unknown = [c for c in commands if c not in EXECUTED and c not in CHECKED]
    assert not unknown, f"README commands neither executed nor checked here (add them to EXECUTED or CHECKED): {unknown}"
    gone = [c for c in [*EXECUTED, *CHECKED] if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"


@pytest.mark.timeout(240)
def test_train_then_evaluate(clone):
    """The first training command, then both evaluation commands on its workdir, as written."""
    run(TRAIN, clone)
    with open(os.path.join(clone, "runs", "arith_cot", "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 400 and "exact_match" in results and "eval_loss" in results
    em = last_json(run(EVAL_EM, clone).stdout)
    assert em["task"] == "exact_match" and em["step"] == 400 and set(em) >= {"exact_match/1", "exact_match/2"}
    with open(os.path.join(clone, "notes.txt"), "w") as f:
        f.write("Notes of mine, in plain text.\n\nA second paragraph: 12 + 30 = 42.\n")
    ppl = last_json(run(EVAL_PPL, clone).stdout)
    assert ppl["task"] == "perplexity" and ppl["perplexity"] > 1


@pytest.mark.timeout(240)
def test_short_training_run(clone):
    """The second training command: 100 steps, only the steps and d_model overridden."""
    run(SHORT, clone)
    with open(os.path.join(clone, "runs", "x", "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(clone, "runs", "x", "config.json")) as f:
        config = json.load(f)
    assert results["step"] == 100 and config["model"]["d_model"] == 64


# Run in one subprocess per call: each `python -m MODULE ARGS` has its flags parsed as the module's own
# `app.run` would (absl's `app.run` is replaced by a parse), then the config it names is validated.
CHECK_FLAGS = r'''
import importlib, json, runpy, sys
from absl import app, flags

class Parsed(Exception):
    pass

def parse_only(main, argv=None, **kwargs):
    flags.FLAGS(sys.argv)
    raise Parsed

def has(config, dotted):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True

def overridden(config, items):
    from train.config import override
    items = list(items)
    missing = [i.split("=", 1)[0] for i in items if not has(config, i.split("=", 1)[0])]
    if missing:
        raise ValueError(f"no such config fields: {missing}")
    return override(config, items)

def check(module, argv):
    from train.config import validate
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except Parsed:
        pass
    else:
        raise RuntimeError(f"{module} does not start with absl's app.run")
    F, names = flags.FLAGS, set(flags.FLAGS)
    if "config" in names:
        if "variants" in names and F.variants:
            for variant in F.variants.split(";"):
                validate(overridden(F.config, filter(None, variant.split(":", 1)[1].split(","))))
        else:
            validate(F.config)
    if "set" in names:
        runner = importlib.import_module(module)
        names = [e if isinstance(e, str) else e[1] for e in getattr(runner, "PAIR", getattr(runner, "EXPERIMENTS", ()))]
        assert names, f"{module}: no experiments found"
        for name in names:
            validate(overridden(importlib.import_module(f"experiments.{name}").get_config(), F.set))

app.run = parse_only
out = []
for module, argv in json.loads(sys.argv[1]):
    before = set(flags.FLAGS)
    try:
        check(module, argv)
        out.append("ok")
    except BaseException as e:
        out.append(f"{type(e).__name__}: {e}")
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
print("RESULTS " + json.dumps(out))
'''


def extras() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def parts(command: str) -> list[list[str]]:
    """The simple commands of an `a && b` line, as words, placeholders filled."""
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command)]
    out, cur = [], []
    for w in words:
        if w == "&&":
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return out + [cur]


@pytest.mark.timeout(120)
def test_checked_commands_are_well_formed(clone):
    """The commands not run here: their modules, flags, config fields, extras, scripts and names exist."""
    from parallel import mesh

    flag_checks, problems = [], []
    for command in CHECKED:
        for words in parts(command):
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words[:3] == ["pip", "install", "-e"]:
                extra = re.fullmatch(r"\.\[(\w+)\]", words[3]).group(1)
                if extra not in extras():
                    problems.append(f"{command}: setup.py has no extra {extra!r}")
            elif words[:3] == ["python", "-m", "pytest"]:
                assert importlib.util.find_spec("pytest") and os.path.exists(os.path.join(ROOT, "pytest.ini"))
            elif words[:2] == ["python", "-m"]:
                flag_checks.append((command, [words[2], words[3:]]))
            elif words[:2] == ["jupyter", "lab"]:
                with open(os.path.join(ROOT, words[2])) as f:
                    assert json.load(f)["nbformat"] == 4
            elif words[0] == "bash":
                script = os.path.join(ROOT, words[1])
                assert subprocess.run(["bash", "-n", script]).returncode == 0, f"{script} does not parse"
                text = open(script).read()
                for variant in words[3:]:  # bench_h200.sh OUT VARIANT ...
                    if not re.search(rf"^\s*(\w+\|)*{re.escape(variant)}[|)]", text, re.M):
                        problems.append(f"{command}: {words[1]} has no variant {variant!r}")
                for key in env:
                    if key not in text:
                        problems.append(f"{command}: {words[1]} does not read {key}")
            elif words[0] == "export":
                names = {w.split("=", 1)[0] for w in words[1:]}
                if names != {mesh.ENV_COORDINATOR, mesh.ENV_NUM_PROCESSES, mesh.ENV_PROCESS_ID}:
                    problems.append(f"{command}: parallel/mesh.py reads other names")
            else:
                problems.append(f"{command}: no check for {words[0]!r}")
    proc = subprocess.run([sys.executable, "-c", CHECK_FLAGS, json.dumps([c for _, c in flag_checks])],
                          cwd=clone, env=user_env(), capture_output=True, text=True, timeout=100)
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")] or [f"RESULTS null {proc.stderr[-2000:]}"]
    results = json.loads(line.split(" ", 1)[1])
    assert results is not None, line
    problems += [f"{command}: {r}" for (command, _), r in zip(flag_checks, results) if r != "ok"]
    assert not problems, "\n".join(problems)


def test_flag_check_catches_mistakes(clone):
    """The check above fails on a misspelt flag, an unknown config field and an invalid config."""
    checks = [["train.bench", ["--config", "experiments/bench_llama_1b.py", "--stepz", "10"]],
              ["train", ["--config", "experiments/arith_cot.py", "--workdir", "w", "--config.mesh.fdsp=8"]],
              ["train", ["--config", "experiments/arith_cot.py", "--workdir", "w", "--config.train.steps=0"]],
              ["experiments.cot_run", ["--set", "model.d_modle=8"]],
              ["train.bench", ["--config", "experiments/bench_llama_1b.py", "--variants", "a:model.dtypo=float32"]],
              ["train.aot", ["--config", "experiments/bench_llama_1b.py", "--topology", "v5e:4x4"]]]
    proc = subprocess.run([sys.executable, "-c", CHECK_FLAGS, json.dumps(checks)], cwd=clone, env=user_env(),
                          capture_output=True, text=True, timeout=100)
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    results = json.loads(line.split(" ", 1)[1])
    assert [r == "ok" for r in results] == [False] * 5 + [True], results


def test_prose_commands_name_existing_modules_and_scripts():
    """Commands quoted inline in the text (`python -m X ...`, `bash experiments/X.sh ...`) name real files."""
    text = open(README).read()
    spans = [re.sub(r"\s+", " ", s) for s in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", text)]
    modules = {m for s in spans for m in re.findall(r"python -m ([\w.]+)", s)}
    scripts = {m for s in spans for m in re.findall(r"bash (\S+\.sh)", s)}
    assert {"experiments.switch_run", "experiments.synthetic_run", "experiments.arith_run"} <= modules
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [s for s in scripts if not os.path.exists(os.path.join(ROOT, s))]
    assert not missing, missing


def _bindings():
    """Names the README's snippets use without defining: ``M`` is any model family, ``c`` the config."""
    import models
    from train.config import base_config

    return {"M": [models.get(f) for f in models.FAMILIES], "c": [base_config()]}


def _resolve(node, scope):
    """The objects an attribute chain ``a.b.c`` names (one per binding of ``a``), or None if ``a`` is unbound."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        bases = _resolve(node.value, scope)
        if bases is None:
            return None
        out = []
        for base in bases:
            if hasattr(base, "keys") and not inspect.ismodule(base) and node.attr in base.keys():
                out.append(base[node.attr])
            elif hasattr(base, node.attr):
                out.append(getattr(base, node.attr))
            else:
                raise AssertionError(f"{ast.unparse(node)}: {type(base).__name__} {getattr(base, '__name__', '')} "
                                     f"has no {node.attr!r}")
        return out
    return None


def test_python_snippets_name_what_exists():
    blocks = code_blocks("python")
    assert len(blocks) >= 4
    for block in blocks:
        tree = ast.parse(block)
        scope = {k: v for k, v in _bindings().items()}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                namespace = {}
                exec(compile(ast.Module([node], []), "<README>", "exec"), namespace)
                scope.update({k: [v] for k, v in namespace.items() if k != "__builtins__"})
        checked = 0
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                if _resolve(node, scope) is not None:
                    checked += 1
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                targets = _resolve(node.func, scope) or []
                for fn in targets:
                    if node.func.attr == "update" and hasattr(getattr(fn, "__self__", None), "keys"):
                        unknown = [k.arg for k in node.keywords if k.arg not in fn.__self__.keys()]
                        assert not unknown, f"{ast.unparse(node)}: no fields {unknown}"
                        continue
                    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                        continue
                    try:
                        inspect.signature(fn).bind(*node.args, **{k.arg: None for k in node.keywords})
                    except TypeError as e:
                        raise AssertionError(f"{ast.unparse(node)}: {e}") from None
        assert checked, f"nothing checked in the snippet:\n{block}"
