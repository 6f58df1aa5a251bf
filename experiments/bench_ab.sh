#!/usr/bin/env bash
# A/B speed of two checkouts in one job on one GPU: the 1.26B train step and greedy decoding,
# alternating A, B, A, B so that drift in the machine shows up as spread, not as a difference.
# Usage (device machine, repo root = B; wheels for grain/ml-collections in .whl):
#   bash experiments/bench_ab.sh OUT A_DIR [ROUNDS]
# A_DIR is another checkout of loom (e.g. `git archive REV | tar -x -C .base`). Prints one table:
# per checkout and round, train tokens/s (fp32 master weights, --nosplit) and decode tokens/s at
# batch 1 and 64; then B / A per round.
set -uo pipefail
out=${1:?OUT}; a_dir=$(cd "${2:?A_DIR}" && pwd); rounds=${3:-2}
b_dir=$PWD; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
for r in $(seq 1 "$rounds"); do
  for side in A B; do
    dir=$a_dir; [ "$side" = B ] && dir=$b_dir
    (cd "$dir" && export PYTHONPATH=/tmp/site:$dir &&
      timeout 300 python3 -m train.bench --config experiments/bench_llama_1b.py --steps 10 --warmup 3 --nosplit \
        --out "$out/train_${side}_$r.json" 2>&1 | grep -v -i warn | tail -2
      timeout 300 python3 -m train.bench --config experiments/bench_llama_1b.py --decode_batches=1,64 \
        --out "$out/decode_${side}_$r.json" 2>&1 | grep -v -i warn | tail -3)
  done
done
python3 - "$out" "$rounds" <<'EOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def row(side, r):
    t = next(iter(json.load(open(f"{out}/train_{side}_{r}.json"))["rows"].values()))
    d = {x["batch"]: x["decode_tokens_per_s"] for x in json.load(open(f"{out}/decode_{side}_{r}.json"))["rows"]}
    return t["tokens_per_s"], t["peak_mem_gb"], d[1], d[64]
print(f"{'side':<5}{'round':>6}{'train tok/s':>13}{'peak GB':>9}{'decode b1':>11}{'decode b64':>12}")
for r in range(1, rounds + 1):
    for side in "AB":
        tr, gb, d1, d64 = row(side, r)
        print(f"{side:<5}{r:>6}{tr:>13.0f}{gb:>9.1f}{d1:>11.1f}{d64:>12.0f}")
for r in range(1, rounds + 1):
    a, b = row("A", r), row("B", r)
    print(f"B/A round {r}: train {b[0] / a[0]:.4f}  decode b1 {b[2] / a[2]:.4f}  decode b64 {b[3] / a[3]:.4f}")
EOF
