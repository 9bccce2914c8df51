"""Packaging for darekit. ``pip install -e .[cpu]`` (or ``[gpu]``) installs the package and
TensorFlow, ``[cluster]`` adds Ray for ``reproduce.py --engine ray``; the scripts under train/,
adv/ and dare/ also run from a bare checkout."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
runtime = [line.strip() for line in (here / "requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith(("#", "tensorflow", "jax"))]
tf_spec = ">=2.16,<2.22"
# One version source: darekit/__init__.py (read as text: importing darekit here would need its
# dependencies before they are installed).
version = re.search(r'^__version__ = "([^"]+)"', (here / "darekit" / "__init__.py").read_text(),
                    re.M).group(1)

setup(
    name="darekit",
    version=version,
    description="Reproduction of DARE (Delta debugging Aided Robustness Enhancement, ASE 2022) "
                "on TensorFlow/Keras 3",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["darekit", "darekit.*"]),
    # The stored parser descriptions: --help and bad options answer before Keras is imported.
    package_data={"darekit.cli": ["parsers.json"]},
    install_requires=runtime,
    extras_require={
        "cpu": [f"tensorflow-cpu{tf_spec}"],
        "gpu": [f"tensorflow[and-cuda]{tf_spec}"],
        # Keras' JAX backend (KERAS_BACKEND=jax); on a GPU install JAX's CUDA build instead.
        "jax": ["jax[cpu]>=0.10,<0.12"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "ray>=2.9"],
        # reproduce.py --engine ray: one Ray task per job on a cluster (darekit.sweep).
        "cluster": ["ray[default]>=2.9"],
    },
)
