"""SmoothQuant vs naive W8A8 on a trained model: eval loss and next-token accuracy of float, naive W8A8
(O1-O3) and SmoothQuant (alpha 0.5, O1-O3), and what the activation statistics show (outlier channels).

    python -m experiments.smoothquant_run --workdir runs/dense_stdlib_s0 --out runs/compress/smoothquant
    python -m experiments.smoothquant_run --hf DIR --config experiments/dense_stdlib.py --out ...

Prints a Markdown table and writes results.json in --out (one subdirectory per variant holding the
compressed model, as ``python -m train.compress`` writes it). Outliers: per linear input, the ratio of
the largest channel's max |x| to the median channel's; SmoothQuant's regime is ratios of ~50-100 on a
few channels (its fig. 4), which small models rarely grow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

VARIANTS = [("naive W8A8 O1", "w8a8", "O1"), ("naive W8A8 O2", "w8a8", "O2"), ("naive W8A8 O3", "w8a8", "O3"),
            ("SmoothQuant O1", "smoothquant", "O1"), ("SmoothQuant O2", "smoothquant", "O2"),
            ("SmoothQuant O3", "smoothquant", "O3")]


def define_flags(extra=()) -> None:
    """The compression experiments' flags (absl; call under ``__main__``): --config (default: the workdir's
    recorded config.json, as ``python -m train.compress`` reads it), --workdir or --hf, --out, --calib_rows,
    --eval_rows, --heal_steps, and ``extra`` as (name, default, help) with the default's type."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config (default: the workdir's config.json).")
    flags.DEFINE_string("workdir", "", "A trained run (its latest checkpoint).")
    flags.DEFINE_string("hf", "", "A Hugging Face checkpoint directory instead of --workdir.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_integer("calib_rows", 64, "Calibration rows (train split).")
    flags.DEFINE_integer("eval_rows", 128, "Evaluation rows (eval split).")
    flags.DEFINE_integer("heal_steps", 200, "QLoRA healing steps after pruning.")
    for name, default, text in extra:
        {int: flags.DEFINE_integer, str: flags.DEFINE_string}[type(default)](name, default, text)
    flags.mark_flags_as_required(["out"])


@dataclasses.dataclass
class Source:
    """What a compression experiment starts from: its flags, config, model family, model config,
    parameters and tokenizer."""
    flags: Any
    config: Any
    model: Any
    mcfg: Any
    params: Any
    tokenizer: Any


def start(main) -> None:
    """Run ``main(source: Source)`` as an absl program (one-line errors, ``train.cli``)."""
    from absl import flags

    from train import cli, compress, data
    from train.evaluate import _recorded_config

    sys.argv, error, _ = _recorded_config(sys.argv)

    def wrapped(argv):
        del argv
        F = flags.FLAGS
        if F.config is None:
            raise error or ValueError("--config is not set; pass an experiment file or a --workdir with the "
                                      "config.json its trainer wrote.")
        model, mcfg, params = compress.load_source(F.config, workdir=F.workdir, hf_dir=F.hf)
        main(Source(F, F.config, model, mcfg, params, data.make_tokenizer(F.config.data)))

    cli.run(wrapped)


def outlier_table(stats: dict) -> str:
    """Per linear kind: the largest and median over layers of max_j|X_j| / median_j|X_j|, channels above 20x."""
    rows = {}
    for key, st in stats.items():
        name = key.split("/")[-1]
        a = np.asarray(st["absmax"]).reshape(-1, st["absmax"].shape[-1])
        ratio = a.max(-1) / np.maximum(np.median(a, -1), 1e-12)
        many = (a > 20 * np.median(a, -1, keepdims=True)).sum(-1)
        rows.setdefault(name, []).append((float(ratio.max()), int(many.max())))
    lines = ["| linear input | max / median channel (largest layer) | (median layer) | channels > 20x median |",
             "|---|---|---|---|"]
    for name, vals in sorted(rows.items()):
        r = np.array([v[0] for v in vals])
        lines.append(f"| {name} | {r.max():.1f} | {np.median(r):.1f} | {max(v[1] for v in vals)} |")
    return "\n".join(lines)


def table(results: list) -> str:
    lines = ["| model | eval loss | next-token accuracy | linear bytes/param | model MB |", "|---|---|---|---|---|"]
    for name, r in results:
        lines.append(f"| {name} | {r['loss']:.4f} | {100 * r['accuracy']:.2f}% | {r['bytes_per_linear_param']:.3f} | "
                     f"{r['model_bytes'] / 2 ** 20:.1f} |")
    return "\n".join(lines)


def main(src: Source):
    from models import quant
    from train import compress

    args, config, model, mcfg, params = src.flags, src.config, src.model, src.mcfg, src.params
    data = compress.prepare_data(config, src.tokenizer, calib_rows=args.calib_rows, eval_rows=args.eval_rows)
    source = {**compress.evaluate(model, mcfg, params, data.evals), **quant.memory_report(params)}
    results = [("float", source)]
    for name, method, act in VARIANTS:
        opts = compress.Options(method=method, act=act, calib_rows=args.calib_rows)
        r = compress.run(config, model, mcfg, params, data, opts, os.path.join(args.out, f"{method}_{act}"),
                         source_eval=source)
        results.append((name, r["result"]))
        print(name, r["result"]["loss"], flush=True)
    stats = quant.calibrate(model, mcfg, params, data.calib)
    text = table(results) + "\n\nActivation statistics (calibration set):\n\n" + outlier_table(stats)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"table": text, "results": results}, f, indent=1, default=float)


if __name__ == "__main__":
    define_flags()
    start(main)
