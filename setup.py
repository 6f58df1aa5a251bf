"""loom: JAX research code for language-model methods, each tested against a reference."""
from setuptools import setup

setup(
    name="loom",
    version="0.1.0",
    description="Pure-function JAX language models, parallelism and training methods.",
    python_requires=">=3.11",
    packages=["models", "parallel", "train", "experiments"],
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml-collections>=1.0",
        "grain>=0.2.12",
        "absl-py>=2.1",
        "numpy>=1.26",
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",
        "pyyaml>=6",  # YAML constitution files (train/cai.py)
    ],
    extras_require={
        # The TPU compiler, for `python -m train.aot` (jax's extra pins the matching libtpu).
        "aot": ["jax[tpu]>=0.10.2"],
        # To open experiments/notebooks/quickstart.ipynb: `jupyter lab experiments/notebooks/quickstart.ipynb`.
        "notebook": ["jupyterlab>=4", "ipykernel>=6.29"],
        "test": [
            "jax[tpu]>=0.10.2",
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "torch==2.13.0",
            "transformers==5.23.0",
            "qwix==0.1.8",  # the reference for the round-to-nearest and NF4 quantizers
        ],
    },
)
