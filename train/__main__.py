"""python -m train --config experiments/NAME.py --workdir DIR [--config.key=value ...] [--debug]"""
from absl import flags
from ml_collections import config_flags

from train import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    result = trainer.run(_CONFIG.value, _WORKDIR.value)
    print({k: v for k, v in result.items() if not k.startswith("exact_match/")})


if __name__ == "__main__":
    cli.run(main)
