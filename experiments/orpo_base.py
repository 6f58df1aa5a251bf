"""The base model of the ORPO comparison (``experiments/orpo_run.py``): the ``arith_cot`` Transformer pretrained
on a mix of arithmetic chains of thought in which a share are corrupted (the last step and the answer wrong, as
the rejected side of ``arithmetic_pairs``), so that preference training has something to unlearn. The mix is a
JSONL file (prompt, completion) that ``orpo_run`` writes (``orpo_run.write_data``); held-out problems, correct,
are the eval split.

    python -m experiments.orpo_run --root runs/orpo     (writes the files, then trains this and the rest)
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.update(source="jsonl", paths=["runs/orpo/data/mix.jsonl"], eval_paths=["runs/orpo/data/heldout.jsonl"])
    c.train.update(steps=1000, batch_size=64, seq_len=96, eval_every=500, exact_match_every=1000)
    return c
