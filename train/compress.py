"""Compress a trained model: quantize (SmoothQuant W8A8, AWQ or RTN int4/int3) or prune (+ QLoRA healing),
write the result and evaluate it.

    python -m train.compress --workdir runs/x --method smoothquant --act O1 --out runs/x/w8a8
    python -m train.compress --workdir runs/x --method awq --bits 4 --group 128 --out runs/x/awq4
    python -m train.compress --workdir runs/x --method prune --drop 2 --heal_steps 200 --out runs/x/pruned
    python -m train.compress --hf DIR --config experiments/dense_stdlib.py --method awq --out DIR/awq4

The source is a trained workdir (its latest checkpoint; the config it recorded, overridable with
--config.section.field=value) or a Hugging Face checkpoint directory (--hf; then --config names the data
used for calibration and evaluation). Calibration rows come from the data's train split, evaluation from
its eval split. Methods: ``smoothquant`` (smoothing with --alpha, then W8A8 at --act O1/O2/O3, --per_channel
weights), ``w8a8`` (the same quantization without smoothing: the naive baseline), ``awq``, ``rtn`` and
``gptq`` (--bits, --group), ``prune`` (--drop layers at the angular-distance argmin or, with --strategy deepest,
before the last layer; --heal_steps of QLoRA on the MLP matrices, --rank: a trainer run in OUT/heal with
train.init_from = OUT/pruned/model.safetensors, the pruned model, and train.adapters='qlora').

Output directory: ``model.safetensors`` (every array, the parts of weight types under "<path>.<field>"),
``compress.json`` (the model config, the method and its settings, each weight type with its static
fields: what ``load`` needs to rebuild the tree) and ``eval.json`` (eval loss and next-token accuracy of
the source and of the result, the memory report). The result generates through ``models.generate``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import awq as awq_lib
from models import lora as lora_lib
from models import prune as prune_lib
from models import quant, weights
from models import smoothquant as sq_lib

METHODS = ("smoothquant", "w8a8", "awq", "rtn", "gptq", "prune")
WEIGHT_TYPES = {cls.__name__: cls for cls in (sq_lib.W8A8, awq_lib.Int4, lora_lib.NF4, lora_lib.Adapter,
                                                weights.LoRA)}


# ----------------------------------------------------------------------------- data

def token_batches(config, tokenizer, split: str, rows: int, batch_size: int, seq_len: int | None = None):
    """Up to ``rows`` rows of the data's ``split`` as a list of LM batches (dicts of int32 [batch, seq])."""
    from train import data

    seq_len = seq_len or config.train.seq_len
    it = iter(data.make_dataset(config.data, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                                split=split, seed=config.seed))
    out = []
    for _ in range(-(-rows // batch_size)):
        out.append({k: np.asarray(v) for k, v in next(it).items()})
    return out


def calibration_tokens(batches, rows: int) -> np.ndarray:
    """The first ``rows`` input rows of ``batches`` [rows, seq]; ValueError when there are fewer."""
    tokens = np.concatenate([b["inputs"] for b in batches])
    return quant.calibration_rows(tokens, rows, tokens.shape[1])


def evaluate(model, mcfg, params, batches) -> dict:
    """{"loss": mean next-token NLL over loss_mask tokens, "accuracy": argmax == target over them, "tokens"}."""
    @jax.jit
    def one(params, batch):
        logits, _ = model.apply(params, batch["inputs"], mcfg, positions=batch["positions"],
                                segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        right = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(right * mask), jnp.sum(mask)

    totals = np.zeros(3)
    for b in batches:
        totals += np.asarray(jax.device_get(one(params, {k: jnp.asarray(v) for k, v in b.items()})), np.float64)
    return {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1), "tokens": totals[2]}


# ----------------------------------------------------------------------------- methods

@dataclasses.dataclass
class Options:
    """Settings of every method (each uses its own)."""
    method: str = "awq"
    alpha: float = 0.5        # smoothquant migration strength
    act: str = "O1"           # smoothquant / w8a8 activation quantization: O1 per-token, O2 per-tensor, O3 static
    per_channel: bool = False
    bits: int = 4             # awq / rtn / gptq
    group: int = 128
    calib_rows: int = 64      # calibration rows of seq_len tokens
    calib_inputs: int = 256   # awq: sampled input rows per linear and calibration batch
    drop: int = 1             # prune: layers to drop
    strategy: str = "angular"  # prune: angular | deepest
    heal_steps: int = 0       # prune: QLoRA steps
    rank: int = 8
    nf4_block: int = 64       # prune: NF4 block of the frozen base
    lr: float = 1e-3


def compress(model, mcfg, params, calib_tokens: np.ndarray, opts: Options, *, config=None, jit=jax.jit):
    """(params, cfg, info) of the compressed model; info: the method, its settings, and what it chose.
    ``jit``: how the forward passes are compiled. Healing a pruned model (``opts.heal_steps``) is ``heal``."""
    if opts.method not in METHODS:
        raise ValueError(f"method is {opts.method!r}; use one of {METHODS}.")
    if opts.strategy not in ("angular", "deepest"):
        raise ValueError(f"strategy is {opts.strategy!r}; use 'angular' (argmin of the angular distance) or "
                         f"'deepest' (the layers before the last).")
    for name in ("calib_rows", "rank", "nf4_block", "group"):
        if getattr(opts, name) <= 0:
            raise ValueError(f"{name} is {getattr(opts, name)}; set it to a positive integer.")
    if opts.heal_steps < 0:
        raise ValueError(f"heal_steps is {opts.heal_steps}; use 0 (no healing) or a positive number of steps.")
    axes = model.param_axes(mcfg)
    info = {"method": opts.method}
    if opts.method in ("smoothquant", "w8a8"):
        stats = quant.calibrate(model, mcfg, params, calib_tokens, jit=jit)
        if opts.method == "smoothquant":
            params, scales = sq_lib.smooth(params, mcfg, stats, opts.alpha)
            stats = sq_lib.smoothed_stats(stats, scales)
            info["alpha"] = opts.alpha
        params, _ = sq_lib.quantize(params, axes, mcfg, act=opts.act, per_channel=opts.per_channel, stats=stats)
        info.update(act=opts.act, per_channel=opts.per_channel)
    elif opts.method in ("awq", "rtn", "gptq"):
        calib = quant.calibrate(model, mcfg, params, calib_tokens, inputs=opts.calib_inputs, jit=jit) \
            if opts.method != "rtn" else None
        params, _, report = awq_lib.quantize(params, axes, mcfg, calib, bits=opts.bits, group=opts.group,
                                             method=opts.method)
        info.update(bits=opts.bits, group=opts.group, alpha=report["alpha"])
    else:
        states = prune_lib.last_token_states(model, mcfg, params, calib_tokens, jit=jit)
        dist = prune_lib.angular_distances(states)
        start = (prune_lib.deepest_start(mcfg, opts.drop) if opts.strategy == "deepest"
                 else prune_lib.best_start(dist, opts.drop, prune_lib._unit(mcfg)))
        params, mcfg = prune_lib.drop_layers(params, mcfg, start, opts.drop)
        info.update(drop=opts.drop, start=start, strategy=opts.strategy, distances=np.nan_to_num(dist, nan=-1).tolist())
    return params, mcfg, info  # healing (opts.heal_steps) is a trainer run on the result: ``heal``


def heal_config(config, init_from: str, n_layers: int, opts: Options):
    """The trainer config of QLoRA healing (``heal``): ``config`` with model.n_layers = the pruned model's,
    train.init_from = its model.safetensors, train.adapters='qlora' (NF4 base in blocks of ``opts.nf4_block``,
    rank ``opts.rank``, alpha = rank, dropout 0.05, on the MLP matrices; everything else frozen),
    ``opts.heal_steps`` steps at optim.lr = ``opts.lr``, every step logged, evaluations off."""
    from train import config as config_lib

    c = config.copy_and_resolve_references()
    c.model.n_layers = n_layers
    c.train.update({k: 0 for k in c.train if k.endswith("_every") and k != "log_every"})
    c.train.update(init_from=str(init_from), adapters="qlora", adapter_rank=opts.rank, adapter_block=opts.nf4_block,
                   adapter_targets=config_lib.ADAPTER_TARGETS, steps=opts.heal_steps, ckpt_every=opts.heal_steps,
                   log_every=1, profile_steps=(0, 0))
    c.optim.update(lr=opts.lr, warmup_steps=min(c.optim.warmup_steps, opts.heal_steps // 10), frozen="")
    return c


def heal(config, init_from: str, n_layers: int, opts: Options, workdir: str):
    """QLoRA healing of the pruned model in ``init_from`` (a model.safetensors written by ``save``) as a run of
    the trainer (``train.trainer.run`` of ``heal_config``) in ``workdir`` (a rerun resumes or reuses it).
    Returns (params with adapters, the training losses of every step)."""
    from train import evaluate as evaluate_lib
    from train import metrics, trainer

    c = heal_config(config, init_from, n_layers, opts)
    trainer.run(c, workdir)
    params = jax.device_get(evaluate_lib.load_state(c, workdir)[1].params)
    return params, [r["loss"] for r in metrics.read_jsonl(workdir) if "loss" in r]


# ----------------------------------------------------------------------------- files

def _flatten(params) -> tuple[dict, dict]:
    """({name: array}, {path: weight-type description}) of a params tree holding weight types."""
    arrays, types = {}, {}

    def walk(prefix, node):
        if isinstance(node, weights.Weight):
            fields = {}
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                if f.metadata.get("pytree_node", True):
                    fields[f.name] = walk(f"{prefix}.{f.name}", value) if isinstance(value, weights.Weight) else None
                    if not isinstance(value, weights.Weight):
                        arrays[f"{prefix}.{f.name}"] = np.asarray(value)
                else:
                    fields[f.name] = value
            return {"type": type(node).__name__, "fields": fields}
        if isinstance(node, dict):
            for k, v in node.items():
                d = walk(f"{prefix}/{k}" if prefix else k, v)
                if d is not None:
                    types[f"{prefix}/{k}" if prefix else k] = d
            return None
        arrays[prefix] = np.asarray(node)
        return None

    walk("", params)
    return arrays, types


def _rebuild(prefix: str, desc: dict, arrays: dict):
    cls = WEIGHT_TYPES[desc["type"]]
    kwargs = {}
    for name, value in desc["fields"].items():
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        if f.metadata.get("pytree_node", True):
            kwargs[name] = (_rebuild(f"{prefix}.{name}", value, arrays) if isinstance(value, dict)
                            else jnp.asarray(arrays[f"{prefix}.{name}"]))
        else:
            kwargs[name] = value
    return cls(**kwargs)


def save(directory: str | os.PathLike, params, mcfg, info: dict, family: str = "transformer") -> None:
    """Write ``model.safetensors`` and ``compress.json`` (see the module docstring)."""
    from safetensors.numpy import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays, types = _flatten(jax.device_get(params))
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(d / "model.safetensors"))
    meta = {"family": family, "model": dataclasses.asdict(mcfg), "compression": info, "weight_types": types}
    (d / "compress.json").write_text(json.dumps(meta, indent=1, default=float))


def load(directory: str | os.PathLike):
    """(family module, cfg, params, info) written by ``save``."""
    from safetensors.numpy import load_file

    d = Path(directory)
    if not (d / "compress.json").is_file():
        raise FileNotFoundError(f"{d} has no compress.json; pass a directory written by train.compress.")
    meta = json.loads((d / "compress.json").read_text())
    model = models.get(meta["family"])
    cfg = model.Config(**meta["model"])
    arrays = load_file(str(d / "model.safetensors"))
    params: dict = {}
    typed = meta["weight_types"]
    for name in sorted({k.split(".", 1)[0] for k in arrays}):
        keys = name.split("/")
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _rebuild(name, typed[name], arrays) if name in typed else jnp.asarray(arrays[name])
    return model, cfg, params, meta["compression"]


# ----------------------------------------------------------------------------- the command

@dataclasses.dataclass
class Data:
    """Token batches for one compression job: calibration rows [rows, seq] and evaluation batches (healing is
    a trainer run with its own data: ``heal``)."""
    calib: np.ndarray
    evals: list


def prepare_data(config, tokenizer, *, calib_rows: int = 64, eval_rows: int = 64, batch_size: int = 8) -> Data:
    """Calibration rows from the data's train split, evaluation rows from its eval split."""
    seq_len = config.train.seq_len
    calib = calibration_tokens(token_batches(config, tokenizer, "train", calib_rows, batch_size, seq_len), calib_rows)
    return Data(calib, token_batches(config, tokenizer, "eval", eval_rows, batch_size, seq_len))


def load_source(config, *, workdir: str = "", hf_dir: str = ""):
    """(model family module, cfg, params) of a trained workdir's latest checkpoint or a Hugging Face directory."""
    if hf_dir:
        from models import hf

        params, mcfg, _ = hf.load_checkpoint(hf_dir, dtype=config.model.dtype)
        model = models.get("mamba" if type(mcfg).__module__.endswith("mamba") else "transformer")
        return model, mcfg, jax.tree.map(jnp.asarray, params)
    if not workdir:
        raise ValueError("pass --workdir (a trained run) or --hf (a Hugging Face checkpoint directory).")
    from train.evaluate import load_state

    setup, state, _ = load_state(config, workdir)
    return setup.model, setup.mcfg, jax.device_get(state.params)


def run(config, model, mcfg, source_params, data: Data, opts: Options, out: str, *, source_eval: dict | None = None
        ) -> dict:
    """Compress, save to ``out``, evaluate source and result; returns (and writes as eval.json) the results."""
    t0 = time.time()
    params, new_cfg, info = compress(model, mcfg, source_params, data.calib, opts, config=config)
    if opts.method == "prune" and opts.heal_steps:  # the pruned model, then QLoRA healing through the trainer
        save(Path(out) / "pruned", params, new_cfg, info, config.model.family)
        params, losses = heal(config, Path(out) / "pruned" / "model.safetensors", new_cfg.n_layers, opts,
                              str(Path(out) / "heal"))
        info.update(heal_steps=opts.heal_steps, rank=opts.rank, heal_loss_first=losses[0], heal_loss_last=losses[-1])
    seconds = time.time() - t0
    save(out, params, new_cfg, info, config.model.family)
    source_eval = source_eval or {**evaluate(model, mcfg, source_params, data.evals),
                                  **quant.memory_report(source_params)}
    results = {"method": opts.method, "options": dataclasses.asdict(opts), "seconds": seconds, "info": info,
               "source": source_eval,
               "result": {**evaluate(model, new_cfg, params, data.evals), **quant.memory_report(params)}}
    if opts.method == "prune" and opts.heal_steps:  # also before healing
        unhealed, _ = prune_lib.drop_layers(source_params, mcfg, info["start"], info["drop"])
        results["pruned_unhealed"] = evaluate(model, new_cfg, unhealed, data.evals)
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def main(argv, recorded_error=None, recorded=False):
    del argv, recorded
    from train import config as config_lib
    from train import data

    config = _CONFIG.value
    if config is None:
        raise recorded_error or ValueError("--config is not set; pass an experiment file or a --workdir with the "
                                           "config.json its trainer wrote.")
    opts = Options(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(Options)})
    model, mcfg, source = load_source(config, workdir=_WORKDIR.value, hf_dir=_HF.value)
    config_lib.validate(config)
    tokenizer = data.make_tokenizer(config.data)
    batches = prepare_data(config, tokenizer, calib_rows=opts.calib_rows, eval_rows=_EVAL_ROWS.value)
    results = run(config, model, mcfg, source, batches, opts, _OUT.value)
    print(json.dumps({k: v for k, v in results.items() if k != "info"}, indent=1, default=float))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from train import cli
    from train.evaluate import _recorded_config

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (default: the workdir's config.json).")
    _WORKDIR = flags.DEFINE_string("workdir", "", "A trained workdir (its latest checkpoint is compressed).")
    _HF = flags.DEFINE_string("hf", "", "A Hugging Face checkpoint directory instead of --workdir.")
    _OUT = flags.DEFINE_string("out", None, "Output directory.")
    _EVAL_ROWS = flags.DEFINE_integer("eval_rows", 64, "Eval-split rows for the evaluation.")
    defaults = Options()
    for f in dataclasses.fields(Options):
        value = getattr(defaults, f.name)
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  str: flags.DEFINE_string}[type(value)]
        define(f.name, value, f"{f.name} (see Options)")
    flags.mark_flags_as_required(["out"])
    sys.argv, _error, _recorded = _recorded_config(sys.argv)
    cli.run(functools.partial(main, recorded_error=_error, recorded=_recorded))
