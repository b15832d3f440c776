"""Packaging. The CUDA extension is not compiled here by setuptools: it is built by
peftkern's own JIT builder (`peftkern build`, or the first use of the cuda backend) into a
versioned cache, so one code path builds it everywhere. At install time we run that builder
when a CUDA toolkit and torch are importable (skip with PEFTKERN_SKIP_CUDA_BUILD=1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so a non-editable install can JIT-build it."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "peftkern" / "csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)
        _maybe_build_extension()


def _maybe_build_extension():
    if os.environ.get("PEFTKERN_SKIP_CUDA_BUILD", "0") == "1":
        print("peftkern: PEFTKERN_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return
    if shutil.which("nvcc") is None:
        print("peftkern: no nvcc on PATH, the CUDA extension will build on first use")
        return
    # Build with the interpreter that installs us, in a subprocess: torch may be absent from an
    # isolated build environment, in which case the build is left to first use.
    code = "import torch; import peftkern._ext as e; e.build(verbose=True)"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = subprocess.call([sys.executable, "-c", code], env=env)
    if rc != 0:
        print("peftkern: CUDA extension not built at install (see above); run 'peftkern build'")


setup(cmdclass={"build_py": BuildPyWithSources})
