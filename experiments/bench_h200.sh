#!/usr/bin/env bash
# One H200 job: loom's 1.26B train-step variants and the Hugging Face + torch.compile peer, same GPU.
# Usage (device machine, repo root; wheels for grain/ml-collections in .whl, the peer script in .peers):
#   bash experiments/bench_h200.sh OUT [VARIANT ...]
#   VARIANT = name:overrides[:XLA_FLAGS] (a training variant), "peer" (HF + torch.compile training),
#             "decode[:XLA_FLAGS]" (loom greedy decoding at $DECODE_BATCHES, default 1,64, and with
#             DECODE_PROFILE=1 a kernel table of the first batch size), "hfgen" (HF generate, $HF_CACHES,
#             default "dynamic static", batch 1 and 64), "scan" (Mamba's selective scans,
#             experiments/bench_mamba_scan.py) or "switch" (Switch 350M vs its dense peer, step split
#             into forward+backward and optimizer) or "mamba" (Mamba 370M vs the Transformer 350M: training
#             tokens/s at sequence 2k, 8k and 32k, 32768 tokens per step, then decoding at batch 64 after a
#             2048-token prompt; commands as in experiments/bench_mamba_370m.py) or "mambapeer" (the official
#             Mamba, experiments/peers/mamba_official.py on checkouts in .peers/mamba and .peers/causal-conv1d,
#             then loom's 370M at the same three shapes on the same GPU; the first call builds the official
#             extensions into .peers/build, about 400 s: a later call on the same warm machine reuses them when
#             it does not carry .peers again)
set -uo pipefail
out=${1:-/tmp/bench}; shift; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
for variant in "$@"; do
  case "$variant" in
    peer) B=8 timeout 300 python3 .peers/torch_llama.py 1b "$out" 2>&1 | grep -E "^1b" || echo "peer failed"
          continue ;;
    decode|decode:*)  # decode[:XLA_FLAGS]; with DECODE_PROFILE=1 the first batch size's kernels are tabulated
      echo "== $variant"
      profile=(); [ "${DECODE_PROFILE:-0}" = 1 ] && profile=(--decode_profile "$(mktemp -d)/trace")
      XLA_FLAGS="$(echo "${variant#decode}" | sed 's/^://')" timeout 300 python3 -m train.bench \
        --config experiments/bench_llama_1b.py --decode_batches="${DECODE_BATCHES:-1,64}" "${profile[@]}" \
        --out "$out/loom_decode$(echo "${variant#decode}" | tr -c 'A-Za-z0-9_\n' '_').json" 2>&1 | grep -v -i warn | tail -34
      continue ;;
    scan) timeout 240 python3 -m experiments.bench_mamba_scan --skip-reference 2>&1 | grep --line-buffered -v -i warn
          continue ;;
    switch) timeout 400 python3 -m train.bench --config experiments/bench_switch_350m.py --steps 10 --warmup 3 \
              --variants 'dense:model.num_experts=0;switch:' --out "$out/switch_350m.json" 2>&1 \
              | grep --line-buffered -v -i warn
            continue ;;
    mamba) V='seq2k:train.batch_size=16,train.seq_len=2048;seq8k:train.batch_size=4,train.seq_len=8192'
           V="$V;seq32k:train.batch_size=1,train.seq_len=32768"
           for m in mamba_370m llama_350m; do
             echo "== $m training"
             timeout 300 python3 -m train.bench --config "experiments/bench_$m.py" --steps 10 --warmup 3 --nosplit \
               --variants "$V" --out "$out/${m}_train.json" 2>&1 | grep --line-buffered -v -i "warn\|^I1"
           done
           for m in mamba_370m llama_350m; do
             echo "== $m decoding"
             timeout 240 python3 -m train.bench --config "experiments/bench_$m.py" --decode_batches=64 \
               --prompt_len 2048 --new_tokens 256 --out "$out/${m}_decode.json" 2>&1 \
               | grep --line-buffered -v -i "warn\|^I1"
           done
           continue ;;
    mambapeer) timeout 560 python3 experiments/peers/mamba_official.py --src .peers --out "$out/mamba_official.json" \
                 --scan 2>&1 | grep --line-buffered -v -i warn | tail -8
               V='seq2k:train.batch_size=16,train.seq_len=2048;seq8k:train.batch_size=4,train.seq_len=8192'
               V="$V;seq32k:train.batch_size=1,train.seq_len=32768"
               timeout 300 python3 -m train.bench --config experiments/bench_mamba_370m.py --steps 8 --warmup 3 \
                 --nosplit --variants "$V" --out "$out/mamba_370m_train.json" 2>&1 \
                 | grep --line-buffered -v -i "warn\|^I1"
               continue ;;
    hfgen) for cache in ${HF_CACHES:-dynamic static}; do
             timeout 240 python3 experiments/peers/hf_generate.py 1b $cache "$out" 1 64 2>&1 | grep -E "^1b" \
               || echo "hf generate ($cache) failed"
           done
           continue ;;
  esac
  IFS=: read -r name overrides flags <<< "$variant"
  # one process per variant, so that peak memory is its own
  XLA_FLAGS="${flags:-}" timeout 240 python3 -m train.bench --config experiments/bench_llama_1b.py --steps 10 \
    --warmup 3 --variants "$name:$overrides" --out "$out/loom_$name.json" 2>&1 | grep -v -i warn | tail -1
done
