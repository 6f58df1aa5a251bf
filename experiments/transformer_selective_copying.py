"""The Transformer peer of ``mamba_selective_copying``: selective copying at train length 256, same
data, steps, batch (256) and optimizer; a 2-layer RoPE Transformer of about Mamba's size.

    python -m train --config experiments/transformer_selective_copying.py \\
        --workdir runs/transformer_selective_copying
    python -m train.evaluate --config experiments/transformer_selective_copying.py \\
        --workdir runs/transformer_selective_copying --task length_generalization  # on a CPU: --chunk 1024
"""
from experiments.mamba_induction import synthetic


def get_config():
    return synthetic("selective_copying", "transformer", batch_size=256)
