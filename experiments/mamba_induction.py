"""Mamba on induction heads (Gu & Dao 2023, section 4.1.2 and appendix E.1), trained at length 256.

A 2-layer Mamba (d_model 64, d_state 16, expand 2; 82k parameters) learns to recall the symbol
that followed the trigger '#' when '#' comes again at the end of 256 random symbols of a
16-symbol alphabet (``data.source='induction_heads'``, see ``train/data/synthetic.py``). It is then
evaluated, teacher-forced, on fixed held-out sets at lengths 2^6..2^14 (the paper goes to 2^20:
override ``data.eval_lengths``). Its peer at about the same size is ``transformer_induction``.
The other synthetic configs (``mamba_selective_copying``, ``transformer_*``) build on ``synthetic``.

    python -m train --config experiments/mamba_induction.py --workdir runs/mamba_induction
    python -m train.evaluate --config experiments/mamba_induction.py --workdir runs/mamba_induction \\
        --task length_generalization --out runs/mamba_induction/lengths.json
    # a second seed (new training stream and init; the held-out sets stay those of data.seed):
    python -m train --config experiments/mamba_induction.py --workdir runs/mamba_induction_s1 --config.seed=1

Lengths up to 2^20: ``--config.data.eval_lengths='(64,256,1024,4096,16384,65536,262144,1048576)'``.
"""
import models
from train import data
from train.config import base_config

MAMBA = dict(family="mamba", vocab_size=259, d_model=64, n_layers=2, d_state=16, expand=2, d_conv=4,
             dtype="bfloat16", remat="full", chunk_size=64)
# About Mamba's size (86k parameters): same width and depth, tied embeddings, MLP 1.5x wide.
TRANSFORMER = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96, tie_embeddings=True)
EVAL_LENGTHS = tuple(2 ** k for k in range(6, 15))  # 64 .. 16384


def synthetic(source: str, family: str, task_length: int = 256, batch_size: int = 64):
    """A synthetic-task run: ``source`` in data.SYNTHETIC_SOURCES, ``family`` 'mamba' or 'transformer'.

    One example per row (``train.seq_len`` = bos + prompt + completion), fresh examples from a
    stream of 2^20 per epoch; the trainer's eval split and the length evaluation are held out."""
    c = base_config()
    c.data.update(source=source, task_length=task_length, num_memorize=16, task_vocab=16, packing=False,
                  eval_examples=256, eval_lengths=EVAL_LENGTHS)
    if family == "mamba":
        c.model = models.config_dict(**MAMBA)
    else:
        c.model.update(TRANSFORMER)
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=4000, batch_size=batch_size, seq_len=data.synthetic_example_tokens(c.data), eval_every=1000,
                   eval_batches=4, ckpt_every=1000, exact_match_every=0, log_every=50)
    return c


def get_config():
    return synthetic("induction_heads", "mamba")
