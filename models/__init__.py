"""Model families behind one protocol (see DESIGN.md): init, param_axes, apply, embed/blocks/head,
block, init_cache, flops_per_token, and a hashable ``Config`` built by ``from_config``."""
from __future__ import annotations

import dataclasses
import importlib

FAMILIES = {"transformer": "models.transformer", "mamba": "models.mamba"}


def get(family: str):
    """The module implementing a model family's protocol."""
    if family not in FAMILIES:
        raise ValueError(f"model.family is {family!r}; use one of {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[family])


def config_from(config_cls, model_cfg, family: str):
    """``config_cls`` from a mapping (an experiment config's ``model`` section, whose ``family`` key
    is ignored); a key that is not a field is refused, naming it and the known fields."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in dict(model_cfg).items() if k != "family"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a {family} field; known fields: {sorted(fields)}.")
    return config_cls(**values)
