"""SL-CAI (Bai et al. 2022, sec. 3) in the arithmetic CAI run (``experiments/cai_run.py``): supervised
fine-tuning of the base model on its own final revisions (``train.cai.critique_revise`` records: the
'jsonl' source reads their prompt and completion fields).

    python -m experiments.cai_run --root runs/cai
"""
from experiments import cai_base


def get_config():
    c = cai_base.get_config()
    c.data.update(paths=["runs/cai/data/sl.jsonl"], eval_paths=["runs/cai/data/sl.jsonl"])
    c.train.update(steps=300, batch_size=64, seq_len=384, eval_every=300)
    c.optim.lr = 1e-3
    return c
