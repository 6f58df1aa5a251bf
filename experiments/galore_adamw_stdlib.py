"""Full-rank AdamW baseline of the GaLore experiment (``experiments/galore_stdlib.py``): the model, data,
steps and schedule of ``experiments/dense_stdlib.py``, AdamW at lr 1e-3 (the runner also tries 3e-3).

    python -m train --config experiments/galore_adamw_stdlib.py --workdir runs/galore_adamw
"""
from experiments import dense_stdlib


def get_config():
    c = dense_stdlib.get_config()
    c.optim.update(name="adamw", lr=1e-3)
    return c
