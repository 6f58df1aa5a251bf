"""The Transformer peer of ``mamba_induction``: induction heads at train length 256, same data,
steps, batch and optimizer; a 2-layer RoPE Transformer of about Mamba's size (86k vs 82k parameters).

    python -m train --config experiments/transformer_induction.py --workdir runs/transformer_induction
    python -m train.evaluate --config experiments/transformer_induction.py \\
        --workdir runs/transformer_induction --task length_generalization
    # second seed: --config.seed=1 and another --workdir

On a CPU add ``--chunk 1024`` to the evaluation: whole 16384-token sequences would materialise
heads x 16384^2 attention scores per layer (15 GB peak measured at float32); in chunks through
the KV cache it peaks at 1.3 GB (about 35 s per 16k example on 2 cores). On a GPU (bfloat16,
cuDNN flash attention) leave it at 0.
"""
from experiments.mamba_induction import synthetic


def get_config():
    return synthetic("induction_heads", "transformer")
