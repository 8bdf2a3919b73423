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
# BNAS_FAST_NATIVE=1 adds -march=native (the kernels are memory-bound; SSE2 already saturates
# bandwidth on this machine, so the portable build is the default).
compile_args = ["-O3", "-fopenmp"]
if os.environ.get("BNAS_FAST_NATIVE") == "1":
    compile_args.append("-march=native")

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
