"""Mamba on selective copying (Gu & Dao 2023, section 4.1.1 and appendix E.1), trained at length 256.

The 2-layer Mamba of ``mamba_induction`` learns to write out, after the marker '=', the 16 data
symbols (of a 16-symbol alphabet) scattered at random positions among noise '.' in a 256-symbol
prompt (``data.source='selective_copying'``; the paper trains at 4096, here 256 like the
induction task, so that both are evaluated at 2^6..2^14). Exact match means all 16 symbols
right; ``token_accuracy/L`` is the share of symbols. Its peer is ``transformer_selective_copying``.
Batch 256 (4x induction's): at batch 64 and 4000 steps both seeds were still at 80% of symbols
right at length 256 (eval loss 0.51 and falling; the paper trains 400k steps).

    python -m train --config experiments/mamba_selective_copying.py --workdir runs/mamba_selective_copying
    python -m train.evaluate --config experiments/mamba_selective_copying.py \\
        --workdir runs/mamba_selective_copying --task length_generalization
    # second seed: --config.seed=1 and another --workdir
"""
from experiments.mamba_induction import synthetic


def get_config():
    return synthetic("selective_copying", "mamba", batch_size=256)
