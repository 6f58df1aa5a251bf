#!/usr/bin/env bash
# The GPU experiments (chain-of-thought, Switch, Mamba) in one H200 job, all at once (small models share the GPU).
# Usage (device machine, repo root; wheels for grain/ml-collections in .whl):
#   bash experiments/h200_experiments.sh OUT SECONDS [GROUP ...]
# GROUP (default: all):
#   cot     chain-of-thought (a), (b), (c) at 2 seeds on the GPU budget COT_SET (experiments/cot_run.py)
#   sc      self-consistency at a budget where greedy is below 100%: cot_trained with COT_SC_SET,
#           2 seeds, then k = 16 at temperatures 0.5, 0.7 and 1.0 on 6-operation problems
#   switch  Switch vs dense on the stdlib corpus, 2 seeds (experiments/switch_run.py: table and plot)
#   synth   Mamba vs Transformer, induction heads and selective copying, 2 seeds, lengths 64..16384
#           (experiments/synthetic_run.py: tables; SYNTH_TASKS=selective_copying for one task)
#   arith   Mamba vs Transformer on the arithmetic corpus, 2 seeds (experiments/arith_run.py: table)
#   galore  GaLore vs full-rank AdamW, 2 lrs each, 2 seeds (experiments/galore_run.py: table and plot)
#   orpo    ORPO vs SFT vs SFT + DPO, seeds SEEDS (default "0 1") in parallel (experiments/orpo_run.py)
#   cai     Constitutional AI end to end, seeds SEEDS in parallel (experiments/cai_run.py; CAI_FLAGS adds its flags)
#   ring    induction heads at 32768 tokens with Ring Attention over every GPU (context = the GPU count,
#           at least 2): the length curriculum of experiments/ring_induction.py (256, 2k and 8k tokens
#           data-parallel over the GPUs, then 32k on the ring, each from the one before), then the length
#           evaluation at 32766 tokens (runs/ring/lengths.json)
#   compress  SmoothQuant, AWQ and pruning (PRUNE_DROPS) of the galore group's AdamW lr 1e-3 seed 0 model
#           (the dense_stdlib config), started when that run has finished
# Checkpoints stay in /tmp/runs. Every run's small files (metrics.jsonl, results.json, plots,
# log.txt) go into OUT/results.tar.gz every 20 s and at the end, so a job cut short still returns
# what it had.
set -uo pipefail
out=${1:-/tmp/out}; limit=${2:-540}; shift 2 || true
groups=${*:-cot sc switch synth arith}
runs=/tmp/runs
mkdir -p "$out" "$runs"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)  # orpo and cai put seed S on GPU S mod ngpu

# The chain-of-thought model on the GPU: 5.2M parameters (d_model 256, 6 layers).
COT_MODEL=(model.d_model=256 model.n_layers=6 model.n_heads=8 model.n_kv_heads=8 model.d_ff=768)
# (a), (b), (c): 1000 steps x 64 x 200 packed tokens (12.8M).
COT_SET=("${COT_MODEL[@]}" train.steps=1000 train.batch_size=64 train.eval_every=500 train.ckpt_every=500)
# self-consistency: 200 steps x 64 x 200 (2.6M tokens, the CPU budget's), where greedy still errs.
COT_SC_SET=("${COT_MODEL[@]}" train.steps=200 train.batch_size=64 train.eval_every=100 train.ckpt_every=200)

job() {  # job NAME CONFIG SEED MEM_FRACTION EVAL_TASK [section.key=value ...]: train, then evaluate
  local name=$1 config=$2 seed=$3 mem=$4 task=$5; shift 5
  local dir=$runs/${name}_s$seed sets=()
  for o in "$@"; do sets+=("--config.$o"); done
  mkdir -p "$dir"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=$mem
  python3 -m train --config "experiments/$config.py" --workdir "$dir" --config.seed="$seed" \
    --config.train.progress=False "${sets[@]}" >"$dir/log.txt" 2>&1 || { echo "$name s$seed: train failed"; return; }
  if [ -n "$task" ]; then
    python3 -m train.evaluate --config "experiments/$config.py" --workdir "$dir" --config.seed="$seed" "${sets[@]}" \
      --task "$task" --out "$dir/results.json" >>"$dir/log.txt" 2>&1 || echo "$name s$seed: eval failed"
  fi
  echo "$name s$seed trained and evaluated at $SECONDS s"
}

sc_job() {  # sc_job SEED: cot_trained at the SC budget, then k = 16 at three temperatures
  local seed=$1 dir=$runs/cot_sc_s$1 sets=()
  for o in "${COT_SC_SET[@]}"; do sets+=("--config.$o"); done
  job cot_sc cot_trained "$seed" 0.05 cot "${COT_SC_SET[@]}"
  for temp in 0.5 0.7 1.0; do
    python3 -m train.evaluate --config experiments/cot_trained.py --workdir "$dir" --config.seed="$seed" "${sets[@]}" \
      --task cot --config.cot.k=16 --config.cot.temperature=$temp --config.cot.steps='(6,)' \
      --out "$dir/sc_k16_t$temp.json" >>"$dir/log.txt" 2>&1 || echo "cot_sc s$seed t$temp: eval failed"
  done
  echo "cot_sc s$seed sweeps done at $SECONDS s"
}

sync_out() {  # one archive (the device returns at most 8 files): OUT/results.tar.gz of every run's small files
  (cd "$runs" && find . -maxdepth 4 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.png' -o -name '*.md' \
     -o -name '*.txt' \) -size -4M -print0 | tar -czf "$out/results.tar.gz.part" --null -T - \
     && mv "$out/results.tar.gz.part" "$out/results.tar.gz")
}

for g in $groups; do case $g in
  cot) python3 -m experiments.cot_run --root "$runs/cot" --seeds 0,1 --parallel 6 \
         $(printf -- "--set %s " "${COT_SET[@]}") >"$runs/cot_run.txt" 2>&1 && echo "cot_run done at $SECONDS s" & ;;
  sc) for seed in 0 1; do sc_job $seed & done ;;
  switch) python3 -m experiments.switch_run --root "$runs/switch" --seeds 0,1 --parallel 4 >"$runs/switch_run.txt" 2>&1 \
            && echo "switch_run done at $SECONDS s" & ;;
  synth) python3 -m experiments.synthetic_run --root "$runs/synthetic" --seeds 0,1 --parallel 8 \
           --tasks "${SYNTH_TASKS:-induction,selective_copying}" \
           >"$runs/synthetic_run.txt" 2>&1 && echo "synthetic_run done at $SECONDS s" & ;;
  arith) python3 -m experiments.arith_run --root "$runs/arith" --seeds 0,1 --parallel 4 >"$runs/arith_run.txt" 2>&1 \
           && echo "arith_run done at $SECONDS s" & ;;
  galore) python3 -m experiments.galore_run --root "$runs/galore" --seeds 0,1 --parallel 4 >"$runs/galore_run.txt" 2>&1 \
            && echo "galore_run done at $SECONDS s" & ;;
  orpo|cai) (extra=""; [ "$g" = cai ] && extra=${CAI_FLAGS:-}  # CAI_FLAGS: cai_run's flags only
             seeds=${SEEDS:-0 1}
             for seed in $seeds; do
               CUDA_VISIBLE_DEVICES=$((seed % ngpu)) python3 -m experiments.${g}_run --root "$runs/$g" --seeds $seed $extra \
                 >"$runs/${g}_s$seed.txt" 2>&1 &
             done; wait
             python3 -m experiments.${g}_run --root "$runs/$g" --seeds "${seeds// /,}" $extra >"$runs/${g}_run.txt" 2>&1 \
               && echo "${g}_run done at $SECONDS s") & ;;
  ring) (ring=(--config experiments/ring_induction.py --config.mesh.context="$ngpu" --config.train.progress=False)
         r=$runs/ring; short=(--config.train.progress=False)
         python3 -m train --config experiments/transformer_induction.py --workdir "$r/ind256" "${short[@]}" \
           >"$runs/ring_run.txt" 2>&1 \
         && python3 -m train --config experiments/ring_induction.py:2k --workdir "$r/ind2k" "${short[@]}" \
           --config.train.init_from="$r/ind256" >>"$runs/ring_run.txt" 2>&1 \
         && python3 -m train --config experiments/ring_induction.py:8k --workdir "$r/ind8k" "${short[@]}" \
           --config.train.init_from="$r/ind2k" >>"$runs/ring_run.txt" 2>&1 \
         && python3 -m train "${ring[@]}" --workdir "$r/ring" --config.train.init_from="$r/ind8k" \
           >>"$runs/ring_run.txt" 2>&1 \
         && python3 -m train.evaluate "${ring[@]}" --workdir "$r/ring" --task length_generalization \
           --out "$r/lengths.json" >>"$runs/ring_run.txt" 2>&1 && echo "ring_run done at $SECONDS s") & ;;
  compress) (src=$runs/galore/lr0.001/galore_adamw_stdlib/seed0
             while [ ! -e "$src/train.json" ]; do sleep 10; done
             echo "compress: source trained at $SECONDS s"
             for e in smoothquant awq; do
               python3 -m experiments.${e}_run --workdir "$src" --out "$runs/compress/$e" >"$runs/${e}_run.txt" 2>&1 &
             done
             python3 -m experiments.prune_run --workdir "$src" --out "$runs/compress/prune" --drops "${PRUNE_DROPS:-1,2,4,6}" \
               >"$runs/prune_run.txt" 2>&1; wait; echo "compress done at $SECONDS s") & ;;
  *) echo "unknown group $g" ;;
esac; done

end=$((SECONDS + limit))
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt $end ]; do sleep 20; sync_out; done
sync_out
echo "finished at $SECONDS s; still running: $(jobs -r | wc -l)"
for f in "$runs"/*_run.txt; do echo "== $f"; grep -v -i "warn\|^I1\|^W1" "$f" | tail -30; done 2>/dev/null  # tables
for f in "$runs"/*/log.txt; do echo "== $f"; grep -v -i "warn\|^I1\|^W1" "$f" | tail -3; done 2>/dev/null  # sc jobs
