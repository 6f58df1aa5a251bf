"""Induction heads at 32768 tokens with Ring Attention: the sequence split over the GPUs of one host.

The Transformer of ``transformer_induction`` (2 layers, d_model 64, RoPE; 86k parameters) on the
induction-heads task of the Mamba paper (``train/data/synthetic.py``) at a training length of
32768 tokens (task_length 32766 + bos + completion), with ``model.attention='ring'`` and
``mesh.context=8``: every device holds 4096 positions of each row (two chunks of 2048 in the
balanced zigzag layout) and keys/values travel around the 8 devices in every layer
(``parallel/ring_attention.py``).

Started at 32k from the 256-token model the model stayed at chance (one scored token a row is
little signal for finding the trigger among 32766 symbols). A length curriculum gets well above
chance (56% after its 1500 steps at 32k, still rising; README, "Ring attention"), each stage
started from the one before (``train.init_from``). The config argument picks the stage (the two
short ones without a ring)::

    python -m train --config experiments/transformer_induction.py --workdir runs/ind256
    python -m train --config experiments/ring_induction.py:2k --workdir runs/ind2k --config.train.init_from=runs/ind256
    python -m train --config experiments/ring_induction.py:8k --workdir runs/ind8k --config.train.init_from=runs/ind2k
    python -m train --config experiments/ring_induction.py --workdir runs/ring_induction \\
        --config.train.init_from=runs/ind8k
    python -m train.evaluate --config experiments/ring_induction.py --workdir runs/ring_induction \\
        --task length_generalization

Other ring sizes: ``--config.mesh.context=2`` on two GPUs, or ``--config.mesh.context=4
--config.mesh.data=2`` (the sequence length must stay a multiple of 2 x context). The trainer's eval
split is held out at the training length.
"""
from experiments.mamba_induction import synthetic

CONTEXT = 8
# stage: (task length, rows a step, steps, eval and checkpoint every); a row is the task + bos + completion
STAGES = {"2k": (2046, 32, 1000, 500), "8k": (8190, 16, 600, 300), "32k": (32766, 8, 1500, 500)}


def get_config(stage: str = "32k"):
    if stage not in STAGES:
        raise ValueError(f"ring_induction stage {stage!r}; use one of {list(STAGES)}.")
    task_length, batch_size, steps, every = STAGES[stage]
    c = synthetic("induction_heads", "transformer", task_length=task_length, batch_size=batch_size)
    c.data.eval_lengths = (task_length,)
    c.train.update(steps=steps, eval_every=every, ckpt_every=every)
    if stage == "32k":
        c.model.update(attention="ring", remat="full")
        c.mesh.update(data=-1, context=CONTEXT)
        c.train.update(log_every=20, eval_batches=2)
        c.optim.update(warmup_steps=200)
    return c
