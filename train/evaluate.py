"""Evaluations by name: held-out loss and perplexity, exact match of greedy answers on the arithmetic
corpus, few-shot chain-of-thought prompting with self-consistency on it, length generalization.

One registry, ``EVALS``, serves the trainer (each entry whose cadence field ``train.<name>_every``
is positive runs every that many steps and at the last step; ``Evaluator``) and the command line,
on a trained workdir's latest checkpoint, with the config the run recorded there (``config.json``:
the experiment file and every override it was trained with); ``--config experiments/NAME.py`` uses
another, and ``--config.section.field=value`` overrides either:

    python -m train.evaluate --workdir runs/arith_cot --task exact_match
    python -m train.evaluate --workdir runs/arith_cot --task perplexity \
        --data held_out.txt          # .txt (every token) or .jsonl (text, or prompt + completion)

Tasks: ``loss`` (the objective's loss and logged sums on the config's eval split: for the paired
objective also the pairs' accuracy and margin), ``perplexity`` (a file), ``exact_match`` (held-out
arithmetic, per step count), ``cot`` (the config's ``cot`` section: few-shot standard and/or
chain-of-thought prompts, greedy and self-consistency, per step count), ``length_generalization``
(a synthetic task of the Mamba paper at each of ``data.eval_lengths``, see `length_generalization`).
Results are printed as JSON and written to ``--out`` if given.

    python -m train.evaluate --workdir runs/mamba_induction --task length_generalization
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from models import generate
from parallel import mesh as mesh_lib
from parallel import sharding
from train import checkpoint, cli, cot, data, workdir_config
from train.setup import setup_training


def eval_metrics(eval_step, params, config, mesh, rules, *, tokenizer, seq_len, batch_size, process_index=0,
                 process_count=1, max_batches: int | None) -> dict[str, float]:
    """Over the first ``max_batches`` eval batches (None: all of them) of ``eval_step`` (``step.make_eval_step``):
    {'eval_<name>': the objective's sum / its total weight, for each of its sums ('eval_loss': e.g. the
    mean next-token cross-entropy per token), and 'eval_<name>' of the model's metrics averaged over
    batches}."""
    ds = data.make_dataset(config.data, split="eval", seed=config.seed, tokenizer=tokenizer, seq_len=seq_len,
                           batch_size=batch_size, process_index=process_index, process_count=process_count)
    weight, sums, means, n = 0.0, {}, {}, 0
    for local in itertools.islice(iter(ds), max_batches):  # the last batch comes padded
        out = jax.device_get(eval_step(params, sharding.global_batch(local, mesh, rules)))
        weight += float(out["weight"])
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in out["sums"].items()}
        means = {k: means.get(k, 0.0) + float(v) for k, v in out["means"].items()}
        n += 1
    return {**{f"eval_{k}": v / max(weight, 1.0) for k, v in sums.items()},
            **{f"eval_{k}": v / max(n, 1) for k, v in means.items()}}


def arithmetic_exact_match(model, mcfg, params, tokenizer, config) -> dict[str, float]:
    """Greedy-decoded held-out problems per step count: {'exact_match/k': accuracy, 'exact_match': mean}.

    ``train.exact_match_n`` problems per step count, or all there are where fewer exist (1
    operation: 273). The answer is the N of the first "The answer is N." in the completion.
    """
    t = config.train
    results = {}
    for k in t.exact_match_steps:
        problems = data.heldout_problems(k, t.exact_match_n, seed=config.data.seed, at_most=True)
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p.prompt) for p in problems]
        outputs = generate.greedy(model, params, mcfg, prompts, max_new_tokens=t.max_new_tokens,
                                  stop_token=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        correct = [data.extract_answer(tokenizer.decode(out)) == p.answer for out, p in zip(outputs, problems)]
        results[f"exact_match/{k}"] = float(np.mean(correct))
    results["exact_match"] = float(np.mean([results[f"exact_match/{k}"] for k in t.exact_match_steps]))
    return results


def arithmetic_cot(model, mcfg, params, tokenizer, config) -> dict[str, float]:
    """Few-shot prompting on ``config.cot.n`` held-out problems per step count in ``config.cot.steps``
    (all of them where fewer exist; ``n/{steps}`` says how many).

    The prompt is `cot.build_prompt` (compact) with ``config.cot.shots`` exemplars from
    `data.exemplar_problems`, in each style of ``config.cot.prompting`` ('standard' exemplars
    answer directly, 'cot' ones show every step). Completions stop at eos or a blank line and
    are scored by `cot.extract_strict`. Keys: ``{style}/greedy/{steps}``, and with ``cot.k`` > 1
    ``{style}/maj@1/{steps}`` and ``{style}/maj@{k}/{steps}`` (Wang et al. 2022: k samples at
    ``cot.temperature``, majority vote), plus ``.../mean`` over the step counts.
    """
    c, d = config.cot, config.data
    exemplars = data.exemplar_problems(c.shots, d.seed, d.min_steps, d.max_steps)

    def generate_fn(rng):
        def fn(prompts, k):
            texts = [p for p in prompts for _ in range(k)]  # equal prompts at other rows sample independently
            out = generate.complete(model, params, mcfg, tokenizer, texts, max_new_tokens=c.max_new_tokens,
                                    stop_strings=["\n\n"], rng=rng, temperature=c.temperature if rng is not None
                                    else 0.0, top_k=c.top_k, top_p=c.top_p)
            return [out[i * k:(i + 1) * k] for i in range(len(prompts))]
        return fn

    results = {}
    for steps in c.steps:
        problems = data.heldout_problems(steps, c.n, seed=d.seed, at_most=True)
        golds = [p.answer for p in problems]
        results[f"n/{steps}"] = len(problems)
        for style in c.prompting:
            prompts = [cot.build_prompt(exemplars, p, chain_of_thought=style == "cot", compact=True) for p in problems]
            results[f"{style}/greedy/{steps}"] = cot.self_consistency(generate_fn(None), prompts, golds, k=1)["maj@1"]
            if c.k > 1:
                rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), steps)
                sc = cot.self_consistency(generate_fn(rng), prompts, golds, k=c.k)
                results[f"{style}/maj@1/{steps}"], results[f"{style}/maj@{c.k}/{steps}"] = sc["maj@1"], sc["maj@k"]
    for name in {key.rsplit("/", 1)[0] for key in results} - {"n"}:
        results[f"{name}/mean"] = float(np.mean([results[f"{name}/{s}"] for s in c.steps]))
    return results



def completion_predictions(model, mcfg, params, inputs: np.ndarray, start: int, width: int, rows: int,
                           chunk: int = 0) -> np.ndarray:
    """Teacher-forced argmax predictions int32 [n, width] at input positions start..start+width-1.

    ``inputs`` [n, seq] goes through ``model.apply`` ``rows`` rows at a time (the last batch filled
    up with copies of row 0, so every batch has one shape). With ``0 < chunk < seq`` each batch
    goes through in pieces of ``chunk`` tokens that continue the model's cache (``init_cache``:
    a KV cache, or Mamba's recurrent state), so attention holds [chunk, seq] scores instead of
    [seq, seq]; the sequence is padded at its end to a multiple of ``chunk``, or else of what the active
    layout's context ring needs (``ring_attention.length_multiple``; causal models never let those pads
    reach the positions read)."""
    from parallel import ring_attention

    n, seq = inputs.shape
    chunked = 0 < chunk < seq
    multiple = ring_attention.length_multiple(sharding.logical_size("seq"), getattr(mcfg, "ring_layout", "zigzag"))
    padded = -(-seq // chunk) * chunk if chunked else -(-seq // multiple) * multiple

    @jax.jit
    def whole(params, tokens):
        logits, _ = model.apply(params, tokens, mcfg)
        return jnp.argmax(logits[:, start:start + width], axis=-1).astype(jnp.int32)

    @jax.jit
    def piece(params, tokens, cache):
        logits, aux = model.apply(params, tokens, mcfg, cache=cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), aux["cache"]

    out = []
    for i in range(0, n, rows):
        batch = inputs[i:i + rows]
        if len(batch) < rows:
            batch = np.concatenate([batch, np.repeat(inputs[:1], rows - len(batch), axis=0)])
        batch = np.pad(batch, ((0, 0), (0, padded - seq)))
        if chunked:
            cache, pieces = model.init_cache(mcfg, rows, padded), []
            for j in range(0, padded, chunk):
                predicted, cache = piece(params, jnp.asarray(batch[:, j:j + chunk]), cache)
                pieces.append(np.asarray(jax.device_get(predicted)))
            predicted = np.concatenate(pieces, axis=1)[:, start:start + width]
        else:
            predicted = np.asarray(jax.device_get(whole(params, jnp.asarray(batch))))
        out.append(predicted[:min(rows, n - i)])
    return np.concatenate(out)


def length_generalization(model, mcfg, params, tokenizer, config, *, chunk: int = 0) -> dict[str, float]:
    """Accuracy on a synthetic task (``data.source`` 'selective_copying' or 'induction_heads') at
    each task length of ``data.eval_lengths`` (default: ``data.task_length``).

    Per length, ``data.eval_examples`` held-out examples (`data.synthetic_heldout`, seeded by
    ``data.seed``: the same fixed sets whatever the training seed) go through the model
    teacher-forced, inputs [bos] + prompt + completion[:-1], and are read by argmax at the
    completion positions: no generation. An example is correct when every completion token is
    (exact match). Rows per pass: as many as fit in a training batch's tokens (``train.batch_size
    * train.seq_len``), at least one; ``chunk`` > 0 feeds long sequences ``chunk`` tokens at a time
    through the model's cache (`completion_predictions`), bounding attention's memory on a CPU.
    Keys: ``accuracy/{length}``, ``token_accuracy/{length}`` (the share of completion tokens
    right) and ``accuracy/mean`` over the lengths.
    """
    d = config.data
    if d.source not in data.SYNTHETIC_SOURCES:
        raise ValueError(f"data.source is {d.source!r}; --task length_generalization needs one of "
                         f"{data.SYNTHETIC_SOURCES}.")
    if chunk < 0:
        raise ValueError(f"--chunk is {chunk}; use 0 (whole sequences) or a positive number of tokens.")
    data.validate(d)
    lengths = tuple(d.eval_lengths) or (d.task_length,)
    width = data.synthetic_completion_length(d)
    budget = config.train.batch_size * config.train.seq_len
    multiple = sharding.batch_multiple()
    results = {}
    for length in lengths:
        records = data.synthetic_heldout(d, length)
        tokens = np.full((len(records), 1 + length + width), tokenizer.bos_id, np.int32)  # row by row: 2^20 fits
        for row, (prompt, completion) in zip(tokens, records):
            row[1:] = tokenizer.encode(prompt + completion)
        inputs, targets = tokens[:, :-1], tokens[:, length + 1:]  # completion token j is read at input length + j
        rows = min(max(1, budget // inputs.shape[1]), len(records))
        rows = -(-rows // multiple) * multiple
        predicted = completion_predictions(model, mcfg, params, inputs, length, width, rows, chunk)
        results[f"accuracy/{length}"] = float(np.mean(np.all(predicted == targets, axis=1)))
        results[f"token_accuracy/{length}"] = float(np.mean(predicted == targets))
    results["accuracy/mean"] = float(np.mean([results[f"accuracy/{n}"] for n in lengths]))
    return results


# ----------------------------------------------------------------------------- the registry

@dataclasses.dataclass(frozen=True)
class Eval:
    """run(evaluator, params) -> {name: value}; ``every``: the ``train`` field of its cadence in the
    trainer ('' for the command line only)."""
    run: Callable[["Evaluator", Any], dict]
    every: str = ""


def _loss(max_batches):
    def run(ev, params):
        t = ev.config.train
        return eval_metrics(ev.eval_step(), params, ev.config, ev.setup.mesh, ev.setup.rules, tokenizer=ev.tokenizer,
                            seq_len=t.seq_len, batch_size=t.batch_size, process_index=jax.process_index(),
                            process_count=jax.process_count(),
                            max_batches=max_batches(t) if max_batches else None)
    return run


def _model_eval(fn, **kwargs):
    return lambda ev, params: fn(ev.setup.model, ev.setup.mcfg, params, ev.tokenizer, ev.config,
                                 **{k: v(ev) for k, v in kwargs.items()})


EVALS: dict[str, Eval] = {
    "loss": Eval(_loss(lambda t: t.eval_batches), every="eval_every"),
    "perplexity": Eval(_loss(None)),  # every batch of the eval split (set to a file by --data)
    "exact_match": Eval(_model_eval(arithmetic_exact_match), every="exact_match_every"),
    "cot": Eval(_model_eval(arithmetic_cot), every="cot_every"),
    "length_generalization": Eval(_model_eval(length_generalization, chunk=lambda ev: ev.chunk),
                                  every="length_generalization_every"),
}
TASKS = tuple(EVALS)


class Evaluator:
    """Runs ``EVALS`` entries on parameters laid out as ``setup`` says (under its mesh and rules, which
    the caller activates); the objective's eval step is compiled once, on first use."""

    def __init__(self, setup, tokenizer, *, chunk: int = 0):
        self.setup, self.config, self.tokenizer, self.chunk = setup, setup.config, tokenizer, chunk
        self._eval_step = None

    def eval_step(self):
        if self._eval_step is None:
            self._eval_step = self.setup.jit_eval_step()
        return self._eval_step

    def due(self, step: int) -> list[str]:
        """The evaluations the trainer runs after ``step``: those whose cadence divides it, and every one
        with a cadence at the last step."""
        t = self.config.train
        return [name for name, e in EVALS.items()
                if e.every and t[e.every] and (step % t[e.every] == 0 or step == t.steps)]

    def run(self, name: str, params) -> dict:
        return EVALS[name].run(self, params)


# ----------------------------------------------------------------------------- standalone entry

def load_state(config, workdir: str, *, recorded: bool = False):
    """(setup, train state, step) from the latest checkpoint in ``workdir``, restored read-only
    with the shardings ``config``'s mesh and rules give (``train.setup.setup_training``).

    A checkpoint that cannot be restored raises CheckpointError saying which config was used
    (``recorded``: the workdir's config.json) and how to pass the one it was trained with."""
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory; train there first or pass another --workdir.")
    ckpt = checkpoint.Checkpointer(ckpt_dir, every=0, keep=1, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is not None:
            _check_stored_shapes(os.path.join(ckpt.directory, str(step)), setup.abstract_state().params)
        restored = ckpt.restore(setup.abstract_state())
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(_restore_failure(e, workdir, recorded)) from e
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint.")
    state, _, step = restored
    return setup, state, step


def _check_stored_shapes(path: str, abstract_params) -> None:
    """CheckpointError naming the first parameter whose stored shape differs from ``abstract_params``' (read
    from the checkpoint's metadata, before any array: a restore that fails part-way leaves reads in flight).
    Metadata that cannot be read is left to the restore to report."""
    import orbax.checkpoint as ocp

    try:
        stored = ocp.StandardCheckpointer().metadata(os.path.join(path, "state")).item_metadata.tree["params"]
        shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    except Exception:  # noqa: BLE001 - any failure here is the restore's to report
        return
    for key, want in jax.tree_util.tree_leaves_with_path(abstract_params):
        name = jax.tree_util.keystr(key)
        if name in shapes and shapes[name] != tuple(want.shape):
            raise checkpoint.CheckpointError(
                f"checkpoint {path} holds parameter {name} of shape {shapes[name]}, but this config's model has "
                f"{tuple(want.shape)}: it was trained with another config.")


def _restore_failure(error: Exception, workdir: str, recorded: bool) -> str:
    """The checkpoint's own report without advice to move it (evaluation only reads it), and which config
    to evaluate with."""
    text = re.sub(r"\s*[^.;]*\bmove\b[^.]*\.", "", str(error)).strip()
    text = text if text.endswith(".") else text + "."
    if recorded:
        return f"{text} (evaluated with {os.path.join(workdir, workdir_config.FILE)}, the config it was trained with)"
    return (f"{text} To evaluate with the config the run was trained with, leave out --config: "
            f"{os.path.join(workdir, workdir_config.FILE)} is used.")


def evaluate_workdir(config, workdir: str, task: str, data_path: str = "", chunk: int = 0, *,
                     recorded: bool = False) -> dict:
    """Restore the latest checkpoint's parameters from ``workdir`` and run ``task`` on them
    (``chunk``: see `length_generalization`; ``recorded``: ``config`` is the workdir's config.json,
    which error messages say)."""
    if task not in TASKS:
        raise ValueError(f"--task is {task!r}; use one of {list(TASKS)}.")
    if task == "perplexity":
        if not data_path:
            raise ValueError("--task perplexity needs --data FILE (.txt or .jsonl).")
        config = config.copy_and_resolve_references()
        config.data.update(source="jsonl" if data_path.endswith(".jsonl") else "text", paths=[data_path],
                           eval_paths=[data_path], loss_on_prompt=True)
    setup, state, step = load_state(config, workdir, recorded=recorded)
    evaluator = Evaluator(setup, data.make_tokenizer(config.data), chunk=chunk)
    results = {"step": step, "task": task}
    with sharding.activate(setup.mesh, setup.rules):
        record = evaluator.run(task, state.params)
    if task in ("loss", "perplexity"):
        loss = record.pop("eval_loss")
        per_token = {"perplexity": math.exp(loss)} if setup.objective.weight_name == "tokens" else {}
        record = dict(loss=loss, **per_token, **record)
    return {**results, **record}


def _recorded_config(argv: list[str]) -> tuple[list[str], Exception | None, bool]:
    """argv with ``--config=train/workdir_config.py:WORKDIR`` added when it names no --config: the workdir's
    recorded config, which ``--config.section.field=value`` flags then override. Returns (argv, the error
    reading that config, if any: main reports it; whether the recorded config is used)."""
    names = ("--config", "-config")
    if any(a in names or a.startswith(tuple(n + "=" for n in names)) for a in argv[1:]):
        return argv, None, False
    workdir = None
    for i, a in enumerate(argv[1:], 1):
        if a in ("--workdir", "-workdir") and i + 1 < len(argv):
            workdir = argv[i + 1]
        elif a.startswith(("--workdir=", "-workdir=")):
            workdir = a.split("=", 1)[1]
    if workdir is None:
        return argv, None, False  # the flag parser reports the missing --workdir
    try:
        workdir_config.load(workdir)
    except (OSError, ValueError) as e:
        return argv, e, False
    return argv[:1] + [f"--config={workdir_config.__file__}:{workdir}"] + argv[1:], None, True


def main(argv, recorded_error=None, recorded=False):
    del argv
    if _CONFIG.value is None:
        raise recorded_error or ValueError("--config is not set; pass an experiment file or leave it out to use "
                                           "the workdir's config.json.")
    results = evaluate_workdir(_CONFIG.value, _WORKDIR.value, _TASK.value, _DATA.value, _CHUNK.value,
                               recorded=recorded)
    print(json.dumps(results, indent=2))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "The experiment config to evaluate with (default: the workdir's config.json, the config "
        "it was trained with, overrides included); --config.section.field=value overrides either.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (its latest checkpoint is evaluated).")
    _TASK = flags.DEFINE_enum("task", "loss", TASKS, "What to evaluate.")
    _DATA = flags.DEFINE_string("data", "", "For --task perplexity: a .txt or .jsonl file.")
    _CHUNK = flags.DEFINE_integer("chunk", 0, "For --task length_generalization: feed sequences this many tokens "
                                  "at a time through the model's cache (0: whole); bounds attention memory on CPU.")
    _OUT = flags.DEFINE_string("out", "", "Also write the results as JSON here.")
    flags.mark_flags_as_required(["workdir"])
    sys.argv, _error, _recorded = _recorded_config(sys.argv)
    cli.run(functools.partial(main, recorded_error=_error, recorded=_recorded))
