#!/usr/bin/env bash
# Scale-out on one host's GPUs, every measurement in one job, for any number of GPUs N (>= 2).
# Usage (device machine, repo root; wheels for grain/ml-collections in .whl):
#   bash experiments/bench_multi_gpu.sh OUT [SECTION ...]      (default: every section)
#   SECTION = scaling   the 1.26B config (experiments/bench_llama_1b.py), 8 sequences of 2048 per GPU:
#                       1 GPU, then data = N and fsdp = N over N GPUs; tokens/s per GPU, efficiency
#             pipeline  GPipe: K = 1, N stages, M = 1, 4, 16, 32 micro-batches (and circular V = 2), for the
#                       Transformer (bench_llama_350m) and Mamba (bench_mamba_370m); bubble vs (K-1)/(M+K-1)
#             ring      ring attention: context = N against the same per-device block on one GPU (the same
#                       blockwise kernel without a ring; cuDNN's for reference), for several blocks;
#                       causal balanced (zigzag) vs unbalanced (contiguous)
#             expert    Switch 350M (experiments/bench_switch_350m.py), 1 GPU vs experts over N GPUs
#             multiprocess  the trainer as N processes (one GPU each, jax.distributed) against 1 process
#                       over N GPUs: their losses side by side (each process packs its own share of the
#                       examples, so the global batches, and the losses, differ a little)
# Then `python3 -m experiments.multi_gpu_tables OUT` prints the README's tables from OUT/*.json.
# Environment: STEPS, WARMUP (timed and untimed steps per variant, default 10 and 3), RING_SEQS (default
# "8192 16384 32768"), PIPELINE_MS (default "1 4 16 32").
set -uo pipefail
out=${1:-/tmp/bench_multi}; shift; mkdir -p "$out"
sections=("$@"); [ ${#sections[@]} -eq 0 ] && sections=(scaling pipeline ring expert multiprocess)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1; echo "GPUs: $N"
quiet() { grep --line-buffered -v -i "warn\|^I1\|^W1"; }
bench() {  # bench NAME GPUS CONFIG VARIANTS [extra flags]: one process, its table row(s) to OUT/NAME.json
  local name=$1 gpus=$2 config=$3 variants=$4; shift 4
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) timeout 400 python3 -m train.bench --config "$config" \
    --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" --nosplit --variants "$variants" --out "$out/$name.json" "$@" 2>&1 | quiet | tail -4
}
for section in "${sections[@]}"; do
  echo "== $section"
  case "$section" in
    scaling)
      bench scaling_1 1 experiments/bench_llama_1b.py "gpu1:train.batch_size=8"
      # one process each: a device's peak memory is the process's (train.bench's peak_mem_gb)
      bench scaling_$N "$N" experiments/bench_llama_1b.py "data$N:mesh.data=$N,mesh.fsdp=1,train.batch_size=$((8 * N))"
      bench scaling_${N}_fsdp "$N" experiments/bench_llama_1b.py \
        "fsdp$N:mesh.data=1,mesh.fsdp=$N,train.batch_size=$((8 * N))" ;;
    pipeline)
      for m in llama_350m mamba_370m; do
        bench "pipeline_${m}_1" 1 "experiments/bench_$m.py" "K1:train.batch_size=32,train.seq_len=1024"
        V=""
        for M in ${PIPELINE_MS:-1 4 16 32}; do
          V="$V;K${N}_M$M:mesh.data=1,mesh.stage=$N,pipeline.microbatches=$M,train.batch_size=32,train.seq_len=1024"
        done
        V="$V;K${N}_M16_V2:mesh.data=1,mesh.stage=$N,pipeline.microbatches=16,pipeline.circular_repeats=2,train.batch_size=32,train.seq_len=1024"
        bench "pipeline_${m}_$N" "$N" "experiments/bench_$m.py" "${V#;}"
      done ;;
    ring)
      for seq in ${RING_SEQS:-8192 16384 32768}; do  # per-device block = seq / N on N GPUs, against that block alone on 1 GPU
        block=$((seq / N))
        bench "ring_1_$block" 1 experiments/bench_llama_1b.py \
          "full$block:train.batch_size=1,train.seq_len=$block,model.attention=ring;cudnn$block:train.batch_size=1,train.seq_len=$block,model.attention=auto"
        bench "ring_${N}_$seq" "$N" experiments/bench_llama_1b.py \
          "ring$seq:mesh.data=1,mesh.context=$N,train.batch_size=1,train.seq_len=$seq,model.attention=ring;ring${seq}_unbalanced:mesh.data=1,mesh.context=$N,train.batch_size=1,train.seq_len=$seq,model.attention=ring,model.ring_layout=contiguous"
      done ;;
    expert)
      bench expert_1 1 experiments/bench_switch_350m.py "gpu1:"
      bench expert_$N "$N" experiments/bench_switch_350m.py \
        "expert$N:mesh.data=1,mesh.expert=$N,train.batch_size=$((8 * N))" --trace "$out/trace_expert" ;;
    multiprocess)
      common=(--config experiments/arith_direct.py --config.train.steps=30 --config.train.progress=False --config.train.log_every=1
              --config.train.eval_every=30 --config.train.ckpt_every=30 --config.mesh.data=$N)
      rm -rf "$out/mp_1" "$out/mp_$N"
      CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((N - 1))) timeout 300 python3 -m train "${common[@]}" --workdir "$out/mp_1" \
        2>&1 | quiet | tail -1
      pids=()
      for ((p = 0; p < N; p++)); do
        CUDA_VISIBLE_DEVICES=$p JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$p \
          timeout 300 python3 -m train "${common[@]}" --workdir "$out/mp_$N" > "$out/mp_proc$p.log" 2>&1 &
        pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid" || echo "a process failed (see $out/mp_proc*.log)"; done
      tail -1 "$out/mp_proc0.log" ;;
    *) echo "unknown section $section" ;;
  esac
done
python3 -m experiments.multi_gpu_tables "$out"
