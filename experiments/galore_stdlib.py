"""GaLore's quality experiment (Zhao et al. 2024, table 2 at small scale): the 27M Llama-style model of
``experiments/dense_stdlib.py`` (d_model 512, 8 layers, byte tokens, Python standard library source)
trained with GaLore at rank d_model / 4 = 128 around Adam (refresh gap 200, scale 0.25, weight decay on
the full weights), against full-rank AdamW (``experiments/galore_adamw_stdlib.py``): same data, steps,
batch and schedule; only the optimizer and its learning rate differ. Learning rates, each tuned over
two values: GaLore 5e-3 and 1e-2 (the paper's 1e-2 with scale 0.25), AdamW 1e-3 and 3e-3.

    python -m experiments.galore_run --root runs/galore     # both optimizers, both lrs, seeds 0 and 1
"""
from experiments import galore_adamw_stdlib


def get_config():
    c = galore_adamw_stdlib.get_config()
    c.optim.update(name="galore", lr=1e-2, galore_inner="adamw", galore_rank=c.model.d_model // 4, galore_gap=200,
                   galore_scale=0.25, galore_proj="std")
    return c
