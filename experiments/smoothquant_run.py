"""SmoothQuant vs naive W8A8 on a trained model: eval loss and next-token accuracy of float, naive W8A8
(O1-O3) and SmoothQuant (alpha 0.5, O1-O3), and what the activation statistics show (outlier channels).

    python experiments/smoothquant_run.py --workdir runs/dense_stdlib_s0 --out runs/compress/smoothquant
    python experiments/smoothquant_run.py --hf DIR --config experiments/dense_stdlib.py --out ...

Prints a Markdown table and writes results.json in --out (one subdirectory per variant holding the
compressed model, as ``python -m train.compress`` writes it). Outliers: per linear input, the ratio of
the largest channel's max |x| to the median channel's; SmoothQuant's regime is ratios of ~50-100 on a
few channels (its fig. 4), which small models rarely grow.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = [("naive W8A8 O1", "w8a8", "O1"), ("naive W8A8 O2", "w8a8", "O2"), ("naive W8A8 O3", "w8a8", "O3"),
            ("SmoothQuant O1", "smoothquant", "O1"), ("SmoothQuant O2", "smoothquant", "O2"),
            ("SmoothQuant O3", "smoothquant", "O3")]


def source_args(description: str, extra=()):
    """The common flags of the compression experiments, parsed; and (config, model, cfg, params, tokenizer)."""
    from train import compress, data, workdir_config
    from train.cli import quiet_platforms

    quiet_platforms()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default="", help="a trained run (its latest checkpoint)")
    p.add_argument("--hf", default="", help="a Hugging Face checkpoint directory instead")
    p.add_argument("--config", default="", help="experiment file (default: the workdir's config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--calib_rows", type=int, default=64)
    p.add_argument("--eval_rows", type=int, default=128)
    p.add_argument("--heal_steps", type=int, default=200)
    for name, kwargs in extra:
        p.add_argument(name, **kwargs)
    args = p.parse_args()
    if args.config:
        import importlib.util
        spec = importlib.util.spec_from_file_location("exp", args.config)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        config = mod.get_config()
    else:
        config = workdir_config.load(args.workdir)
    model, mcfg, params = compress.load_source(config, workdir=args.workdir, hf_dir=args.hf)
    tokenizer = data.make_tokenizer(config.data)
    return args, config, model, mcfg, params, tokenizer


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


def main():
    from models import quant
    from train import compress

    args, config, model, mcfg, params, tokenizer = source_args(__doc__.splitlines()[0])
    data = compress.prepare_data(config, tokenizer, calib_rows=args.calib_rows, eval_rows=args.eval_rows)
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
    main()
