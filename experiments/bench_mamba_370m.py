"""Speed benchmark: Mamba at the size of the paper's 370M model (d_model 1024,
48 layers, d_state 16, expand 2, d_conv 4; tied embeddings) with vocab 32000, against the dense
Transformer ``experiments/bench_llama_350m.py``: same optimizer, batch (8 x 2048) and dtypes (bf16
compute, float32 parameters). The selective scan is the fused Pallas kernel (``models/scan_kernel.py``;
``--variants 'xla:model.scan=chunked'`` for the XLA scan). Activations are not rematerialised (remat
"none", as the official implementation trains) and the 48 layers are unrolled (``layer_unroll=0``,
``layers.layer_scan``): 84.8 GB at 32768 tokens a step, 1.13-1.15x the speed of remat "dots" in a layer
loop, which takes 29.3 GB (on a GPU of 80 GB: ``--variants 'dots:model.remat=dots,model.layer_unroll=1'``);
the Transformer's config keeps "dots" in a loop.

Parameters (``init`` under ``jax.eval_shape``): this Mamba 352,797,696 (its tied embedding
32,768,000 of them; ``matmul_params`` 350,486,528; with the paper's vocabulary of 50280 it would
be the paper's 371M); the Transformer peer 373,867,520 (untied embedding and head 65,536,000;
``matmul_params`` 341,049,344). Training FLOPs per token (``flops_per_token``): Mamba 2.15G at
every length; the Transformer 2.35G at 2k, 3.26G at 8k, 6.88G at 32k (causal attention).

Training tokens/s at equal tokens per step (32768) and sequence 2k, 8k, 32k, for both families
(a 32k row is one sequence, so 32768 tokens; ``--nosplit``: the step alone, no fwd/bwd split):

    V='seq2k:train.batch_size=16,train.seq_len=2048;seq8k:train.batch_size=4,train.seq_len=8192'
    V="$V;seq32k:train.batch_size=1,train.seq_len=32768"
    python -m train.bench --config experiments/bench_mamba_370m.py --steps 10 --warmup 3 --nosplit \
        --variants "$V" --out mamba_370m_train.json
    python -m train.bench --config experiments/bench_llama_350m.py --steps 10 --warmup 3 --nosplit \
        --variants "$V" --out llama_350m_train.json

Decoding tokens/s at batch 64 after a 2048-token prompt, 256 new tokens (Mamba: a constant
state of 48 x 64 x (2048 x 16 float32 + 3 x 2048 bf16), 440 MB; the Transformer: a KV cache of
64 x 2304 positions, 14.5 GB in bf16, read whole by every step):

    python -m train.bench --config experiments/bench_mamba_370m.py --decode_batches=64 --prompt_len 2048 \
        --new_tokens 256 --out mamba_370m_decode.json
    python -m train.bench --config experiments/bench_llama_350m.py --decode_batches=64 --prompt_len 2048 \
        --new_tokens 256 --out llama_350m_decode.json

A 4096-token prompt (``--prompt_len 4096``) may not fit the Transformer's prefill at batch 64:
attention over a cache never takes cuDNN (``models.attention.auto_choice``), and XLA's attention holds
float32 scores [64, 16, 4096, 4352], 73 GB, for one layer at a time (19 GB at prompt 2048).

No length field is needed for either family at 32k: the Transformer's RoPE is computed from the
positions (no table, no maximum length) and Mamba has no positions. The Transformer's
``attention="auto"`` picks cuDNN flash attention on GPU for bf16 training (plain causal, head_dim
64; no [seq, seq] scores are held at 32k). Both keep activations per token, so equal tokens per step
hold equal activation memory at every length: measured peaks on one H200 were, with remat "dots", 42.1 GB
(Mamba; 35.7 GB since dt is stored in bf16, 29.3 GB since dt's kernel) and 30.0 GB (Transformer) at 2k, 8k
and 32k alike; Mamba without remat, unrolled, 84.8 GB at each.
"""
import models
from experiments import bench_llama_350m


def get_config():
    c = bench_llama_350m.get_config()
    peer = c.model
    c.model = models.config_dict(
        "mamba", vocab_size=peer.vocab_size, d_model=1024, n_layers=48, d_state=16, d_conv=4, expand=2,
        tie_embeddings=True, dtype=peer.dtype, param_dtype=peer.param_dtype, remat="none", layer_unroll=0,
        scan="pallas", chunk_size=64, scan_splits=0, decode="auto")
    return c
