"""AWQ vs round-to-nearest weight-only quantization on a trained model: eval loss and next-token accuracy of
float, RTN, GPTQ and AWQ at int4 and int3 (group 128), with the memory of the linears and of the model.

    python -m experiments.awq_run --workdir runs/dense_stdlib_s0 --out runs/compress/awq
    python -m experiments.awq_run --hf DIR --config experiments/dense_stdlib.py --out ...

Prints a Markdown table and writes results.json in --out (one subdirectory per variant holding the
compressed model, as ``python -m train.compress`` writes it) with AWQ's searched alpha per block.
"""
from __future__ import annotations

import json
import os

from experiments.smoothquant_run import define_flags, start, table

VARIANTS = [("RTN int4", "rtn", 4), ("GPTQ int4", "gptq", 4), ("AWQ int4", "awq", 4),
            ("RTN int3", "rtn", 3), ("GPTQ int3", "gptq", 3), ("AWQ int3", "awq", 3)]


def main(src):
    from models import quant
    from train import compress

    args, config, model, mcfg, params = src.flags, src.config, src.model, src.mcfg, src.params
    data = compress.prepare_data(config, src.tokenizer, calib_rows=args.calib_rows, eval_rows=args.eval_rows)
    source = {**compress.evaluate(model, mcfg, params, data.evals), **quant.memory_report(params)}
    results, alphas = [("float", source)], {}
    group = 128 if mcfg.d_model % 128 == 0 and mcfg.d_ff % 128 == 0 else 32
    for name, method, bits in VARIANTS:
        opts = compress.Options(method=method, bits=bits, group=group, calib_rows=args.calib_rows)
        r = compress.run(config, model, mcfg, params, data, opts, os.path.join(args.out, f"{method}{bits}"),
                         source_eval=source)
        results.append((name, r["result"]))
        alphas[name] = r["info"].get("alpha")
        print(name, r["result"]["loss"], f"{r['seconds']:.1f}s", flush=True)
    text = table(results) + f"\n\n(group {group}; float row: float32 parameters)"
    print(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"table": text, "results": results, "alpha": alphas}, f, indent=1, default=float)


if __name__ == "__main__":
    define_flags()
    start(main)
