"""Build glue: maps kernels/ into the package and compiles csrc/ into salm_fast._C.

Metadata lives in pyproject.toml. The extension is plain C++17 + OpenMP through
pybind11; CPU tensors cross as NumPy arrays, so torch is not needed to build.
"""
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

openmp = ["-fopenmp"] if sys.platform != "darwin" else ["-Xpreprocessor", "-fopenmp"]
ext = Pybind11Extension(
    "salm_fast._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    # -ffp-contract=off: no FMA contraction, so results stay bit-identical to the
    # reference; -fno-math-errno / -fno-trapping-math: sqrt need not set errno and
    # compares need not trap, so those loops vectorize (no value-changing math flag);
    # no -march=native, so a built wheel runs on any x86-64 CPU.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", *openmp],
    extra_link_args=openmp if sys.platform != "darwin" else ["-lomp"],
)

setup(
    packages=find_packages(include=["salm_fast", "salm_fast.*"]) + ["salm_fast.kernels"],
    package_dir={"salm_fast": "salm_fast", "salm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
