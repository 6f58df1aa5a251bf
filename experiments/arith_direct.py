"""The arith_cot budget on the direct variant: the answer line only, no intermediate results.

python -m train --config experiments/arith_direct.py --workdir runs/arith_direct
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.variant = "direct"
    c.train.max_new_tokens = 24
    return c
