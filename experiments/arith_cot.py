"""Default experiment: a 0.9M-parameter Transformer learns multi-step arithmetic with chain-of-thought.

python -m train --config experiments/arith_cot.py --workdir runs/arith_cot
"""
from train.config import base_config


def get_config():
    c = base_config()
    c.data.source = "arithmetic"
    c.data.variant = "cot"
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, remat="full")
    # eval_every: steps / 2 (base_config); exact match at the last step (steps + 0: a value derived from
    # train.steps, which setting leaves train.steps alone; the plain reference would be train.steps itself).
    c.train.update(steps=400, batch_size=64, seq_len=96, exact_match_every=c.train.get_ref("steps") + 0,
                   exact_match_n=64, max_new_tokens=96)
    return c
