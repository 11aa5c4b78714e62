"""llava_jax: LLaVA (visual instruction tuning) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA training, conversion and evaluation in JAX/Flax (NNX).",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    package_data={"llava_jax": ["assets/llama_tokenizer/*", "datagen/prompts/*", "datagen/prompts/**/*", "eval/prompts/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array_record",
        "importlib_resources",
        "ml_collections",
        "absl-py",
        "transformers>=4.57",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "pillow",
        "numpy",
        "tqdm",
        "tensorboardX",
        "psutil",
    ],
    extras_require={
        # torch CPU build 2.13.0 lies on disk here; a bare `torch` would pull a CUDA build.
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "pytest-timeout"],
    },
)
