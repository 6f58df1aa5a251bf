"""Chain-of-thought prompting (Wei et al. 2022), experiment (a): one model, two kinds of prompt.

A 0.9M-parameter Transformer trains on contexts of 1-3 arithmetic problems with 1-6 operations,
each context all chain-of-thought or all direct (half each, ``data.variant='mixture'``). It is
then prompted with 2 exemplars of one style on held-out problems of 1-8 operations: standard
exemplars (answer only) against chain-of-thought exemplars (every intermediate result). The
budget (400 steps of 32 x 200 packed tokens) runs in minutes on a CPU.

    python -m train --config experiments/cot_prompting.py --workdir runs/cot_prompting
    python -m train.evaluate --config experiments/cot_prompting.py --workdir runs/cot_prompting --task cot
    python -m experiments.cot_run --root runs/cot   # (a), (b) and (c) at 2 seeds, with the tables
"""
from train.config import base_config

TRAIN_STEPS = (1, 6)  # operations per training problem; held-out problems go up to 8


def common():
    """Model, budget and evaluation shared by the three chain-of-thought experiments: equal packed
    training tokens (steps x batch x seq_len) for every arm."""
    c = base_config()
    c.data.update(source="arithmetic", min_steps=TRAIN_STEPS[0], max_steps=TRAIN_STEPS[1])
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, remat="full")
    c.optim.update(lr=3e-3, warmup_steps=40)
    c.train.update(steps=400, batch_size=32, seq_len=200, eval_every=200, eval_batches=4, ckpt_every=200,
                   exact_match_every=0, log_every=25)
    c.cot.update(n=500, steps=(1, 2, 3, 4, 5, 6, 7, 8), max_new_tokens=64)
    return c


def get_config():
    c = common()
    c.data.update(variant="mixture", context_problems=3, cot_fraction=0.5)
    c.cot.update(shots=2, prompting=("standard", "cot"), k=1)
    return c
