"""Chain-of-thought training, experiments (b) and (c): a model trained on worked solutions only.

Same model and packed-token budget as ``cot_prompting``; every training example is one problem
with its steps. Evaluated zero-shot on held-out problems, greedy and with self-consistency
(Wang et al. 2022: 8 samples at temperature 0.7, majority vote). Its peer is ``cot_direct``.

    python -m train --config experiments/cot_trained.py --workdir runs/cot_trained
    python -m train.evaluate --config experiments/cot_trained.py --workdir runs/cot_trained --task cot
"""
from experiments import cot_prompting


def get_config():
    c = cot_prompting.common()
    c.data.variant = "cot"
    c.cot.update(shots=0, prompting=("cot",), k=8, temperature=0.7)
    return c
