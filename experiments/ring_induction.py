"""Induction heads at 32768 tokens with Ring Attention: the sequence split over 8 devices.

The Transformer of ``transformer_induction`` (2 layers, d_model 64, RoPE; 86k parameters) on the
induction-heads task of the Mamba paper (``train/data/synthetic.py``) at a training length of
32768 tokens (task_length 32766 + bos + completion), with ``model.attention='ring'`` and
``mesh.context=8``: every device holds 4096 positions of each row (two chunks of 2048 in the
balanced zigzag layout) and keys/values travel around the 8 devices in every layer
(``parallel/ring_attention.py``). On one 8-GPU host::

    python -m train --config experiments/ring_induction.py --workdir runs/ring_induction

Other ring sizes: ``--config.mesh.context=4 --config.mesh.data=2`` (the sequence length must stay
a multiple of 2 x context). The trainer's eval split is held out at the training length.
"""
from experiments.mamba_induction import synthetic

TASK_LENGTH = 32766  # + bos + completion = 32768 tokens per row
CONTEXT = 8


def get_config():
    c = synthetic("induction_heads", "transformer", task_length=TASK_LENGTH, batch_size=8)
    c.model.update(attention="ring", remat="full")
    c.mesh.update(data=-1, context=CONTEXT)
    c.data.eval_lengths = (TASK_LENGTH,)
    c.train.update(steps=2000, eval_every=500, ckpt_every=500, log_every=20, eval_batches=2)
    c.optim.update(warmup_steps=200)
    return c
