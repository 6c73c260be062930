"""Build hook for the optional C++ CPU extension ``qipo_kernels._C``.

All package metadata lives in pyproject.toml. This file only declares the pybind11 extension.

- The build needs pybind11 and a C++17 compiler with GCC/Clang vector extensions (GCC >= 8, Clang >= 10);
  no torch headers.
- Default flags are portable (-O3, no -march=native). On x86-64 the kernels are compiled three
  times: with the platform default, with -mavx2 -mfma and with -mavx512f/vl/dq/bw; the module picks
  the best one the CPU supports at import (override with QIPO_KERNELS_ISA=base|avx2|avx512).
- If the build fails, installation fails. Set QIPO_KERNELS_NO_EXT=1 to install without the
  extension; backend "auto" then uses the PyTorch reference and
  ``python -m qipo_kernels.backends`` says why the C++ backend is absent.
"""
import os
import platform
import sys

from setuptools import setup

NO_EXT = os.environ.get("QIPO_KERNELS_NO_EXT", "0") == "1"
X86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
# Extra flags for the per-instruction-set sources (added on top of the common flags).
ISA_FLAGS = {
    "isa_avx2.cpp": ["-mavx2", "-mfma"],
    "isa_avx512.cpp": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx2", "-mfma"],
}


def ext_modules():
    if NO_EXT:
        print("qipo_kernels: QIPO_KERNELS_NO_EXT=1, not building the C++ extension qipo_kernels._C", file=sys.stderr)
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    class BuildExt(build_ext):
        """Adds ISA_FLAGS to the sources they name, and says how to skip the extension if the build fails."""

        def build_extensions(self):
            comp = self.compiler
            if X86 and hasattr(comp, "_compile"):
                orig = comp._compile

                def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
                    extra = list(extra_postargs) + ISA_FLAGS.get(os.path.basename(src), [])
                    return orig(obj, src, ext, cc_args, extra, pp_opts)

                comp._compile = _compile
            try:
                super().build_extensions()
            except Exception:
                print("\nqipo_kernels: building the C++ extension qipo_kernels._C failed (see above). It needs "
                      "pybind11 and a C++17 GCC/Clang compiler. To install without it (backend 'auto' then "
                      "uses the PyTorch reference) set QIPO_KERNELS_NO_EXT=1.\n", file=sys.stderr)
                raise

    macros = [("QK_BUILD_X86_VARIANTS", "1")] if X86 else []
    ext = Pybind11Extension(
        "qipo_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/isa_base.cpp", "csrc/isa_avx2.cpp", "csrc/isa_avx512.cpp"],
        include_dirs=["csrc"],
        define_macros=macros,
        extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden"],
        cxx_std=17,
    )
    ext.depends = ["csrc/qk_api.h", "csrc/kernels_impl.h"]
    return [ext], {"build_ext": BuildExt}


if __name__ == "__main__":
    _exts, _cmds = ext_modules()
    setup(ext_modules=_exts, cmdclass=_cmds)
