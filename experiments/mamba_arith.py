"""Mamba on the arithmetic corpus at the parameter count of ``arith_cot``'s Transformer.

``arith_cot`` (a 4-layer Transformer, d_model 128, untied embeddings: 0.92M parameters) with the
model replaced by an 8-layer Mamba of the same width (d_state 16, expand 2, tied embeddings:
0.97M parameters; the paper's convention of two Mamba blocks per Transformer layer). Same
data, steps, batch, sequence length, optimizer and evaluation (greedy exact match per step count).

    python -m train --config experiments/mamba_arith.py --workdir runs/mamba_arith
    python -m train.evaluate --config experiments/mamba_arith.py --workdir runs/mamba_arith --task exact_match
    # its peer:
    python -m train --config experiments/arith_cot.py --workdir runs/arith_cot
"""
import models
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.model = models.config_dict("mamba", vocab_size=259, d_model=128, n_layers=8, d_state=16, expand=2, d_conv=4,
                                 dtype="bfloat16", remat="full", chunk_size=32)
    return c
