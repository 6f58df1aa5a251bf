"""The base model of the Constitutional AI run (``experiments/cai_run.py``): a Transformer pretrained on the
templated CAI formats over arithmetic (``train.cai.format_corpus`` with ``experiments/constitutions/arith.json``):
responses (half of them flawed: a wrong last step, a wrong format, or both), critiques under a principle,
revisions, and (A)/(B) comparisons. The corpus is a JSONL file (prompt, completion) that ``cai_run`` writes.

    python -m experiments.cai_run --root runs/cai
"""
from experiments import arith_cot


def get_config():
    c = arith_cot.get_config()
    c.data.update(source="jsonl", paths=["runs/cai/data/corpus.jsonl"], eval_paths=["runs/cai/data/corpus_eval.jsonl"])
    c.model.update(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=768)
    c.train.update(steps=1500, batch_size=64, seq_len=384, eval_every=750, exact_match_every=0)
    return c
