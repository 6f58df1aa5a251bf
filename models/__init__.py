"""Model families behind one protocol (see DESIGN.md): init, param_axes, apply, embed/blocks/head,
block, init_cache, flops_per_token, and a hashable ``Config`` built by ``from_config``."""
from __future__ import annotations

import importlib

FAMILIES = {"transformer": "models.transformer", "mamba": "models.mamba"}


def get(family: str):
    """The module implementing a model family's protocol."""
    if family not in FAMILIES:
        raise ValueError(f"model.family is {family!r}; use one of {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[family])
