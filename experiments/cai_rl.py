"""RL-CAI's policy stage in the arithmetic CAI run (``experiments/cai_run.py``), the cheaper alternative the
open recipes use instead of PPO against the preference model: ORPO (``train.objective='orpo'``) from the SL-CAI
model on the AI-feedback pairs with their soft labels (chosen = response A, label = P(A preferred)).

    python -m experiments.cai_run --root runs/cai
"""
from experiments import cai_base


def get_config():
    c = cai_base.get_config()
    c.data.update(source="preference", paths=["runs/cai/data/rl.jsonl"], eval_paths=["runs/cai/data/rl_eval.jsonl"],
                  packing=False)
    c.train.update(objective="orpo", orpo_lambda=1.0, steps=300, batch_size=32, seq_len=384, eval_every=300)
    c.optim.lr = 1e-3
    return c
