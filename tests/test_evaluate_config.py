"""The tiny config of the trainer tests, as a config file for command-line tests."""
from tests.helpers import tiny_train_config as tiny_config


def get_config():
    return tiny_config(steps=4)
