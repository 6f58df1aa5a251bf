"""The scale-out tables from ``experiments/bench_multi_gpu.sh``'s output directory (README markdown).

    python -m experiments.multi_gpu_tables OUT

Each ``OUT/NAME.json`` is one ``train.bench`` process (NAME = section_GPUS[_...]); ``OUT/mp_*`` are
trainer work directories. A missing file or a failed variant becomes a row saying so.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys


def _rows(out: str, name: str) -> dict:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["rows"]


def _gpus(out: str, prefix: str) -> int | None:
    counts = [int(m.group(1)) for p in glob.glob(os.path.join(out, f"{prefix}_*.json"))
              if (m := re.fullmatch(rf"{prefix}_(\d+)", os.path.basename(p)[:-5])) and int(m.group(1)) > 1]
    return max(counts) if counts else None


def _ok(row) -> bool:
    return bool(row) and "error" not in row


def _per_gpu(one: dict | None, rows: dict, n: int | None, extra=lambda row: []) -> list[str]:
    """Table rows: the 1-GPU row, then each N-GPU row with tokens/s per GPU and its efficiency against one GPU;
    ``extra(row)`` gives the table's further cells (the 1-GPU row leaves them empty)."""
    blank = ["" for _ in extra({})]
    lines = []
    if _ok(one):
        lines.append("| " + " | ".join(["1 GPU", "1", f"{one['tokens_per_s']:,.0f}", f"{one['tokens_per_s']:,.0f}",
                                         "1.00", *extra(one)]) + " |")
    for name, row in (rows if n else {}).items():
        if not _ok(row):
            lines.append("| " + " | ".join([name, str(n), f"failed: {row.get('error', 'missing')[:80]}", "", "",
                                             *blank]) + " |")
            continue
        per = row["tokens_per_s"] / n
        eff = f"{per / one['tokens_per_s']:.2f}" if _ok(one) else "-"
        lines.append("| " + " | ".join([name, str(n), f"{row['tokens_per_s']:,.0f}", f"{per:,.0f}", eff,
                                         *extra(row)]) + " |")
    return lines


def scaling(out: str) -> str:
    n = _gpus(out, "scaling")
    rows = {**_rows(out, f"scaling_{n}"), **_rows(out, f"scaling_{n}_fsdp")}  # one process each

    def memory(r):
        planned = r.get("planned_mem_gb")
        return [f"{r['peak_mem_gb']:.1f}", "-" if planned is None else f"{planned:.1f}"] if r else ["", ""]

    return "\n".join(["| 1.26B, 8 x 2048 tokens per GPU | GPUs | tokens/s | tokens/s per GPU | efficiency | "
                      "peak GB/GPU | planned GB/GPU |", "|---|---|---|---|---|---|---|",
                      *_per_gpu(_rows(out, "scaling_1").get("gpu1"), rows, n, memory)])


def pipeline(out: str) -> str:
    n = _gpus(out, "pipeline_llama_350m") or _gpus(out, "pipeline_mamba_370m")
    lines = ["| model | schedule | tokens/s | speedup over K=1 | measured bubble 1 - speedup/K | (K-1)/(VM+K-1) |",
             "|---|---|---|---|---|---|"]
    for model in ("llama_350m", "mamba_370m"):
        base = _rows(out, f"pipeline_{model}_1").get("K1")
        if _ok(base):
            lines.append(f"| {model} | K=1 (1 GPU) | {base['tokens_per_s']:,.0f} | 1.00 | - | 0 |")
        for name, row in (_rows(out, f"pipeline_{model}_{n}") if n else {}).items():
            m = re.fullmatch(r"K(\d+)_M(\d+)(?:_V(\d+))?", name)
            k, mb, v = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            ideal = (k - 1) / (v * mb + k - 1)
            if not _ok(row) or not _ok(base):
                lines.append(f"| {model} | K={k}, M={mb}, V={v} | failed: {row.get('error', 'no K=1 row')[:60]} | "
                             f"| | {ideal:.3f} |")
                continue
            speedup = row["tokens_per_s"] / base["tokens_per_s"]
            lines.append(f"| {model} | K={k}, M={mb}, V={v} | {row['tokens_per_s']:,.0f} | {speedup:.2f} | "
                         f"{1 - speedup / k:.3f} | {ideal:.3f} |")
    return "\n".join(lines)


def ring(out: str) -> str:
    lines = ["| sequence (GPUs) | per-GPU block | 1 GPU, block alone: step s (cuDNN) | ring step s | measured ratio | "
             "FLOPs ratio | overhead | unbalanced step s | balanced speedup |", "|---|---|---|---|---|---|---|---|---|"]
    paths = glob.glob(os.path.join(out, "ring_*_*.json"))
    runs = (re.fullmatch(r"ring_(\d+)_(\d+)", os.path.basename(p)[:-5]) for p in paths)
    for n, seq in sorted((int(m.group(1)), int(m.group(2))) for m in runs if m and m.group(1) != "1"):
        block = seq // n
        full = _rows(out, f"ring_1_{block}").get(f"full{block}")
        cudnn = _rows(out, f"ring_1_{block}").get(f"cudnn{block}")
        rows = _rows(out, f"ring_{n}_{seq}")
        bal, unbal = rows.get(f"ring{seq}"), rows.get(f"ring{seq}_unbalanced")
        if not (_ok(full) and _ok(bal)):
            err = (bal or {}).get("error") or (full or {}).get("error") or "missing"
            lines.append(f"| {seq} ({n}) | {block} | failed: {err[:80]} | | | | | | |")
            continue
        measured = bal["step_s"] / full["step_s"]
        flops = bal["flops_per_token"] / full["flops_per_token"]  # per-device FLOPs ratio: seq/n tokens each
        unb = f"{unbal['step_s']:.4f} | {unbal['step_s'] / bal['step_s']:.2f}" if _ok(unbal) else "failed | -"
        ref = f" ({cudnn['step_s']:.4f})" if _ok(cudnn) else ""
        lines.append(f"| {seq} ({n}) | {block} | {full['step_s']:.4f}{ref} | {bal['step_s']:.4f} | {measured:.2f} | "
                     f"{flops:.2f} | {measured / flops - 1:+.1%} | {unb} |")
    return "\n".join(lines)


def expert(out: str) -> str:
    n = _gpus(out, "expert")

    def collectives(r):
        share = r.get("collective_share")
        return [f"{1e3 * r['collective_s']:.1f} ms", f"{share:.1%}"] if share is not None else ["-", "-"]

    return "\n".join(["| Switch 350M (8 experts) | GPUs | tokens/s | tokens/s per GPU | efficiency | collectives per "
                      "step (GPU 0) | share of step |", "|---|---|---|---|---|---|---|",
                      *_per_gpu(_rows(out, "expert_1").get("gpu1"), _rows(out, f"expert_{n}"), n, collectives)])


def multiprocess(out: str) -> str:
    def losses(workdir):
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}

    dirs = sorted(d for d in glob.glob(os.path.join(out, "mp_*")) if os.path.isdir(d))
    if len(dirs) < 2:
        return "multi-process: not run"
    one, many = losses(dirs[0]), losses(dirs[1])
    common = sorted(set(one) & set(many))
    if not common:
        return f"multi-process: no common logged steps ({os.path.basename(dirs[0])}: {len(one)}, " \
               f"{os.path.basename(dirs[1])}: {len(many)})"
    diff = max(abs(one[s] - many[s]) for s in common)
    first, last = common[0], common[-1]
    return (f"multi-process: {len(common)} logged steps; loss at step {first}: {one[first]:.6f} (1 process) vs "
            f"{many[first]:.6f} ({os.path.basename(dirs[1])[3:]} processes), at step {last}: {one[last]:.5f} vs "
            f"{many[last]:.5f}; max |difference| {diff:.2e}")


def main(out: str) -> None:
    if not glob.glob(os.path.join(out, "*.json")) and not glob.glob(os.path.join(out, "mp_*")):
        raise SystemExit(f"{out} holds no results of experiments/bench_multi_gpu.sh (no NAME.json, no mp_*); "
                         f"pass the OUT directory that job wrote.")
    for title, table in (("Data / FSDP scaling", scaling), ("GPipe", pipeline), ("Ring attention", ring),
                         ("Expert parallelism", expert), ("Multi-process", multiprocess)):
        print(f"\n### {title}\n\n{table(out)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench_multi")
