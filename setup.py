"""instructgpt_jax: the InstructGPT recipe (pretrain -> SFT -> RM -> PPO/PPO-ptx) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="instructgpt_jax",
    version="0.1.0",
    description="InstructGPT end to end in JAX/Flax: GPT pretraining (dense or sparse attention), SFT, reward model, PPO-ptx.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["instructgpt_jax", "instructgpt_jax.*"]),
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # orbax's path type, which its handlers take (train/checkpoint.py)
        "tensorflow-datasets>=4.9.7",  # array_record builders; TensorFlow itself is not needed
        "array_record>=0.5",
        "importlib_resources",  # tfds imports it but does not declare it
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist"],
        "hf": ["transformers", "torch"],
    },
    entry_points={"console_scripts": ["instructgpt-jax=instructgpt_jax.main:run"]},
)
