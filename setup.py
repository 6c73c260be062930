"""Build hook for the optional C++ CPU extension ``qipo_kernels._C``.

All package metadata lives in pyproject.toml. This file only declares the pybind11 extension
(added with the csrc/ backend); set QIPO_KERNELS_NO_EXT=1 to skip building it.
"""
from setuptools import setup

setup()
