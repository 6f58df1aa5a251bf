"""ORPO (Hong et al. 2024) on arithmetic preference pairs: chosen, a correct chain of thought; rejected, the same
with a wrong last step and answer (``data.source='arithmetic_pairs'``), with ``train.objective='orpo'``:

    loss = NLL(chosen) / |chosen| + lambda * -log sigmoid(log odds(chosen) - log odds(rejected))

(mean per-token log-probs in the odds, lambda = ``train.orpo_lambda``). The same 0.9M-parameter Transformer as
``arith_cot``; one pair per row (packing works too: pairs are found by segment). The eval split's loss task
reports the held-out pairs' loss, log odds ratio, chosen/rejected log-probs and preference accuracy; exact match
is the held-out answer accuracy of greedy decoding.

    python -m train --config experiments/orpo_arith.py --workdir runs/orpo_arith
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.source = "arithmetic_pairs"
    c.data.packing = False
    c.train.update(objective="orpo", orpo_lambda=0.1, orpo_nll_on_prompt=False, steps=400, batch_size=32,
                   seq_len=96, eval_every=200, exact_match_every=400)
    return c
