"""Builds the C++ extension bnas_fast._C from csrc/ with torch.utils.cpp_extension and ninja.

Everything else (metadata, dependencies, the console script) is in pyproject.toml. Install with
``pip install --no-build-isolation .`` after torch, so the extension builds against the installed
torch instead of a second copy pulled into an isolated build environment.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

# -fopenmp: at::parallel_for is header-inlined; without it the loops run on one thread.


# -march=native: the extension is always built on the machine that runs it (pip builds from
# source); with SSE2 alone the mix kernels were compute-bound at 0.5x torch.compile's AVX-512 loop.
# BNAS_FAST_PORTABLE=1 builds for the baseline ISA instead (for a wheel that must run elsewhere).
compile_args = ["-O3", "-fopenmp"]
if os.environ.get("BNAS_FAST_PORTABLE") != "1":
    compile_args += ["-march=native", "-mprefer-vector-width=512"]

setup(
    ext_modules=[
        CppExtension(
            name="bnas_fast._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": compile_args},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
