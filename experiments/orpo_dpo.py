"""DPO (Rafailov et al. 2023) after SFT, the ORPO paper's baseline (``experiments/orpo_run.py``): pairs of
``arithmetic_pairs`` written to JSONL with the SFT model's summed response log-probs as the frozen reference
(``train.orpo.add_reference_logps``), read by the 'preference' source with ``data.reference_logps=True``;
``train.objective='dpo'`` with beta = 0.1.

    python -m experiments.orpo_run --root runs/orpo
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.update(source="preference", paths=["runs/orpo/data/pairs_ref.jsonl"],
                  eval_paths=["runs/orpo/data/heldout_pairs_ref.jsonl"], reference_logps=True, packing=False)
    c.train.update(objective="dpo", dpo_beta=0.1, steps=200, batch_size=32, seq_len=96, eval_every=100,
                   exact_match_every=200)
    return c
