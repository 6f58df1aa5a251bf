"""RL-CAI's policy optimization with PPO (Bai et al. 2022, sec. 4; ``train/ppo.py``) in the arithmetic CAI run:
the SL-CAI policy (``cai_sl``) against the preference model (``cai_pm``), a per-token KL penalty to the SL-CAI
policy as the frozen reference, GAE, clipped policy and value losses; value head = the head's column of an unused
token. ``train.steps`` iterations of ``train.batch_size`` rollouts. Its own entry point, on the trainer's state,
optimizer, checkpoints and metrics:

    python -m train.ppo --config experiments/cai_ppo.py --workdir runs/cai/seed0/ppo \\
        --config.ppo.prompts=runs/cai/seed0/data/prompts.jsonl --config.ppo.policy_workdir=runs/cai/seed0/sl \\
        --config.ppo.pm_workdir=runs/cai/seed0/pm
"""
from experiments import cai_sl
from train import ppo


def get_config():
    c = cai_sl.get_config()
    c.ppo = ppo.default_config()
    c.ppo.update(prompts="runs/cai/seed0/data/prompts.jsonl", policy_workdir="runs/cai/seed0/sl",
                 pm_workdir="runs/cai/seed0/pm", reward_token=3, value_token=4, max_new_tokens=64)
    c.train.update(steps=100, batch_size=64, ckpt_every=50, eval_every=0)
    c.optim.update(lr=1e-5, warmup_steps=0, weight_decay=0.0)
    return c
