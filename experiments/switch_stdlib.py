"""Switch Transformer experiment: ``experiments/dense_stdlib.py`` with every other
MLP replaced by a Switch layer of 8 experts (Fedus et al. 2021): top-1 routing, capacity factor
1.25 in training and 2.0 in evaluation, routing groups of 1024 tokens (two sequences), load
balancing loss 0.01 and router z-loss 1e-3, no expert dropout.

Each expert has the dense model's d_ff, so the FLOPs per token match the dense peer (plus the
router's 512 x 8); parameters grow from 27.5M to 93.6M (4 layers x 7 extra experts x 2.36M).
Same data, steps, batch and optimizer as the peer. Two seeds, on one H200 (a few minutes each):

    python -m train --config experiments/switch_stdlib.py --workdir runs/switch_stdlib_s0
    python -m train --config experiments/switch_stdlib.py --workdir runs/switch_stdlib_s1 --config.seed=1

Besides loss and ``eval_loss``, ``metrics.jsonl`` (and TensorBoard) hold per MoE layer i (1, 3,
5, 7) ``moe/dropped_fraction/layer{i}``, ``moe/load_min|load_max|load_entropy/layer{i}`` and
``moe/aux_loss|z_loss/layer{i}``, and ``moe/loss`` (their sum added to the objective);
``moe.png`` plots the load and drop curves. ``python -m experiments.switch_run`` runs both configs
at two seeds and compares the step at which ``eval_loss`` first reaches the dense run's best
``eval_loss`` (the best, not the final one: after about 1830 steps the data repeats and both eval
losses rise).
"""
from experiments import dense_stdlib


def get_config():
    c = dense_stdlib.get_config()
    c.model.update(num_experts=8, moe_every=2, moe_top_k=1, moe_capacity_factor_train=1.25,
                   moe_capacity_factor_eval=2.0, moe_group_size=1024, moe_dispatch="capacity",
                   moe_aux_loss_coef=0.01, moe_z_loss_coef=1e-3, moe_expert_dropout=0.0)
    return c
