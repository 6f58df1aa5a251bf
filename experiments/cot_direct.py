"""Direct-answer training, experiment (b)'s peer: ``cot_trained``'s budget in packed tokens, answers only.

    python -m train --config experiments/cot_direct.py --workdir runs/cot_direct
    python -m train.evaluate --config experiments/cot_direct.py --workdir runs/cot_direct --task cot
"""
from experiments import cot_prompting


def get_config():
    c = cot_prompting.common()
    c.data.variant = "direct"
    c.cot.update(shots=0, prompting=("standard",), k=1, max_new_tokens=24)
    return c
