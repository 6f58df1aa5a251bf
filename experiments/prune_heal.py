"""QLoRA healing of a pruned ``dense_stdlib`` model as an ordinary trainer run (Gromov et al. 2024, sec. 3.2;
QLoRA: Dettmers et al. 2023): the pruned model from ``train.compress --method prune`` (its
``model.safetensors``) is ``train.init_from``, ``train.adapters='qlora'`` puts rank-8 adapters over an NF4
base on the MLP matrices, and only the adapters train (200 steps at lr 1e-3, the source run's data,
batch and optimizer otherwise); ``train.compress.heal_config`` builds this config.

    python -m train.compress --workdir runs/dense_stdlib_s0 --method prune --drop 2 --out runs/prune2
    python -m train --config experiments/prune_heal.py --workdir runs/prune2/heal \\
        --config.train.init_from=runs/prune2/model.safetensors --config.model.n_layers=6

``model.n_layers`` must be the pruned model's (``compress.json``: "model"/"n_layers", dense_stdlib's 8
minus --drop; 6 here by default): another count is refused, naming the first mismatching parameter. The
run's checkpoints hold the adapted parameters (``train.evaluate`` reads them like any run's).
``python -m train.compress ... --heal_steps 200`` runs the same healing itself (in OUT/heal).
"""
from experiments import dense_stdlib
from train import compress

DROP = 2


def get_config():
    source = dense_stdlib.get_config()
    opts = compress.Options(method="prune", drop=DROP, heal_steps=200, rank=8, lr=1e-3, nf4_block=64)
    c = compress.heal_config(source, "runs/prune2/model.safetensors", source.model.n_layers - DROP, opts)
    c.train.log_every = 10
    return c
