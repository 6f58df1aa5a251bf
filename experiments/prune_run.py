"""Layer pruning curve on a trained model (Gromov et al. 2024): eval loss and next-token accuracy against
the fraction of layers dropped, by angular distance and by the deepest-layers heuristic, before and after
QLoRA healing; and the angular-distance heatmap.

    python -m experiments.prune_run --workdir runs/dense_stdlib_s0 --out runs/compress/prune --heal_steps 200
    python -m experiments.prune_run ... --drops 1,2,4 --strategies angular     (a part of the curve)

Writes prune_curve.png, distances.png, results.json in --out and prints a Markdown table.
"""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.smoothquant_run import define_flags, start


def plots(out: str, curve: dict, dist: np.ndarray, n_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("angular", "-"), ("deepest", "--")):
        for stage, marker in (("before", "o"), ("after", "s")):
            pts = [(n / n_layers, r[stage]["loss"], r[stage]["accuracy"]) for n, r in sorted(curve[key].items())]
            if pts:
                f, loss, acc = zip(*pts)
                axes[0].plot(f, loss, style, marker=marker, label=f"{key}, {stage} healing")
                axes[1].plot(f, acc, style, marker=marker, label=f"{key}, {stage} healing")
    axes[0].set(xlabel="fraction of layers dropped", ylabel="eval loss")
    axes[1].set(xlabel="fraction of layers dropped", ylabel="next-token accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "prune_curve.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(dist, origin="lower", aspect="auto", cmap="viridis")
    ax.set(xlabel="first layer l", ylabel="block size n", title="angular distance d(x_l, x_{l+n})")
    ax.set_yticks(range(dist.shape[0]), [str(n + 1) for n in range(dist.shape[0])])
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "distances.png"), dpi=120)


def main(src):
    from models import prune
    from train import compress

    args, config, model, mcfg, params = src.flags, src.config, src.model, src.mcfg, src.params
    data = compress.prepare_data(config, src.tokenizer, calib_rows=args.calib_rows, eval_rows=args.eval_rows)
    base = compress.evaluate(model, mcfg, params, data.evals)
    dist = prune.angular_distances(prune.last_token_states(model, mcfg, params, data.calib))
    unit = prune._unit(mcfg)
    curve = {"angular": {}, "deepest": {}}
    lines = ["| dropped | strategy | start | eval loss before healing | after | accuracy before | after |",
             "|---|---|---|---|---|---|---|",
             f"| 0 | - | - | {base['loss']:.4f} | - | {100 * base['accuracy']:.2f}% | - |"]
    drops = [int(n) for n in args.drops.split(",")] if args.drops else range(unit, mcfg.n_layers - unit + 1, unit)
    for n in drops:
        for strategy in args.strategies.split(","):
            if strategy == "deepest" and unit > 1:
                continue
            opts = compress.Options(method="prune", drop=n, strategy=strategy, heal_steps=args.heal_steps, rank=8,
                                    nf4_block=64 if mcfg.d_model % 64 == 0 and mcfg.d_ff % 64 == 0 else 16)
            r = compress.run(config, model, mcfg, params, data, opts, os.path.join(args.out, f"{strategy}_{n}"),
                             source_eval=base)
            before = r.get("pruned_unhealed", r["result"])
            curve[strategy][n] = {"before": before, "after": r["result"], "start": r["info"]["start"]}
            lines.append(f"| {n}/{mcfg.n_layers} | {strategy} | {r['info']['start']} | {before['loss']:.4f} | "
                         f"{r['result']['loss']:.4f} | {100 * before['accuracy']:.2f}% | "
                         f"{100 * r['result']['accuracy']:.2f}% |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"table": text, "curve": curve, "distances": np.nan_to_num(dist, nan=-1).tolist(), "base": base},
                  f, indent=1, default=float)
    try:
        plots(args.out, curve, dist, mcfg.n_layers)
    except ImportError as e:  # no matplotlib here: the numbers are in results.json
        print(f"no plots: {e}")


if __name__ == "__main__":
    define_flags([("drops", "", "Comma-separated layer counts to drop (default: every count that leaves a layer)."),
                  ("strategies", "angular,deepest", "Comma-separated: angular, deepest.")])
    start(main)
