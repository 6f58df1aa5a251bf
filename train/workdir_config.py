"""The config a workdir was trained with, read back from the ``config.json`` the trainer writes there.

Also an experiment config file for ml-collections' ``--config`` flag, with the workdir after a colon:
``--config=train/workdir_config.py:runs/x`` (``train.evaluate`` uses it when ``--config`` is left
out), so ``--config.section.field=value`` overrides work on it as on any experiment file.
"""
from __future__ import annotations

import json
import os

import ml_collections

from train.config import base_config

FILE = "config.json"


def _typed(value, template):
    """JSON lists back to the tuples configs use (lists where the base config has a list: data.paths)."""
    if isinstance(value, dict):
        return {k: _typed(v, template.get(k) if isinstance(template, dict) else None) for k, v in value.items()}
    if isinstance(value, list):
        items = [_typed(v, None) for v in value]
        return items if isinstance(template, list) else tuple(items)
    return value


def load(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config ``workdir``'s trainer recorded; FileNotFoundError or ValueError naming the file."""
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} has no {FILE} (the trainer writes it there); pass --workdir of a "
                                f"trained run, or --config experiments/NAME.py with the overrides it was trained "
                                f"with.")
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass --config experiments/NAME.py with the overrides "
                         f"the run was trained with.") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} does not hold a config (a JSON object).")
    template = base_config().to_dict()
    return ml_collections.ConfigDict(_typed(recorded, template))


def get_config(workdir: str) -> ml_collections.ConfigDict:
    return load(workdir)
