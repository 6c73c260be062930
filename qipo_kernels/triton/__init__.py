"""Triton kernels (backend "triton"). Importing this package registers them with qipo_kernels.backends.

Imported lazily by backends._load: if triton is missing or broken, the import error is recorded as
the reason the backend is unavailable and qipo_kernels itself still imports.
"""
from . import loss, select  # noqa: F401
