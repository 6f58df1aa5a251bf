"""The preference model of RL-CAI (Bai et al. 2022, sec. 4.1) in the arithmetic CAI run
(``experiments/cai_run.py``): the SL-CAI model with a scalar head (the head's column of an unused token,
``train.reward_token``) trained with the soft-label Bradley-Terry loss on the AI-feedback pairs
(``train.cai.feedback_labels`` records, read by the 'preference' source; ``train.objective='preference_model'``).

    python -m experiments.cai_run --root runs/cai
"""
from experiments import cai_base


def get_config():
    c = cai_base.get_config()
    c.data.update(source="preference", paths=["runs/cai/data/rl.jsonl"], eval_paths=["runs/cai/data/rl_eval.jsonl"],
                  packing=False)
    c.train.update(objective="preference_model", reward_token=3, steps=300, batch_size=32, seq_len=384,
                   eval_every=300)
    c.optim.lr = 1e-3
    return c
