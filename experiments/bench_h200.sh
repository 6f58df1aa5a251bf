#!/usr/bin/env bash
# One H200 job: loom's 1.26B train-step variants and the Hugging Face + torch.compile peer, same GPU.
# Usage (device machine, repo root; wheels for grain/ml-collections in .whl, the peer script in .peers):
#   bash experiments/bench_h200.sh OUT [VARIANT ...]
#   VARIANT = name:overrides[:XLA_FLAGS] (a training variant), "peer" (HF + torch.compile training),
#             "decode" (loom greedy decoding, batch 1 and 64) or "hfgen" (HF generate, batch 1 and 64)
set -uo pipefail
out=${1:-/tmp/bench}; shift; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
for variant in "$@"; do
  case "$variant" in
    peer) B=8 timeout 300 python3 .peers/torch_llama.py 1b "$out" 2>&1 | grep -E "^1b" || echo "peer failed"
          continue ;;
    decode) timeout 300 python3 -m train.bench --config experiments/bench_llama_1b.py --decode_batches=1,64 \
              --out "$out/loom_decode.json" 2>&1 | grep -v -i warn | tail -4
            continue ;;
    hfgen) timeout 300 python3 experiments/peers/hf_generate.py 1b "$out" 1 64 2>&1 | grep -E "^1b" \
             || echo "hf generate failed"
           continue ;;
  esac
  IFS=: read -r name overrides flags <<< "$variant"
  # one process per variant, so that peak memory is its own
  XLA_FLAGS="${flags:-}" timeout 240 python3 -m train.bench --config experiments/bench_llama_1b.py --steps 10 \
    --warmup 3 --variants "$name:$overrides" --out "$out/loom_$name.json" 2>&1 | grep -v -i warn | tail -1
done
