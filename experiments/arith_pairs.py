"""A paired objective on arithmetic: the margin between a correct chain of thought and the same with a
wrong answer (``train.objective='pair_margin'`` on ``data.source='arithmetic_pairs'``).

    loss = -log sigmoid(beta (log p(chosen) - log p(rejected))) + nll_weight NLL(chosen) / |chosen|

The same 0.9M-parameter Transformer as ``arith_cot``; each row holds one problem (no packing),
prompt tokens masked out. The eval split's loss task reports the held-out pairs' loss, accuracy
(log p(chosen) > log p(rejected)) and margin.

    python -m train --config experiments/arith_pairs.py --workdir runs/arith_pairs
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.source = "arithmetic_pairs"
    c.data.packing = False
    c.train.update(objective="pair_margin", pair_beta=1.0, pair_nll_weight=1.0, steps=400, batch_size=32,
                   seq_len=96, eval_every=200, exact_match_every=400)
    return c
