"""SFT alone, the ORPO comparison's first baseline (``experiments/orpo_run.py``): from the base model
(``orpo_base``), next-token training on the correct chains of thought only (the chosen side of the pairs), at
the compute of ``orpo_arith`` (64 rows a step: ORPO's 32 pairs are 64 rows).

    python -m experiments.orpo_run --root runs/orpo
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.update(source="arithmetic", variant="cot")
    c.train.update(steps=400, batch_size=64, seq_len=96, eval_every=200, exact_match_every=400)
    return c
