"""lorakit's C++ kernels (csrc/), built once with torch's C++ extension loader (a C++ compiler and ninja) into
lorakit's cache (~/.cache/lorakit/compiled). Where one cannot be built, its caller runs torch's operations instead,
after one line on stderr saying why."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from .loading import cache_dir

CSRC = Path(__file__).parent / "csrc"
TRAINING_SOURCES = ("causal_attention.cpp", "rms_norm.cpp", "swiglu.cpp", "softmax_cross_entropy.cpp",
                    "training_kernels.cpp")


def cpu_runs_kernels() -> bool:
    """Whether this CPU has the instructions lorakit's kernels are written in (AVX-512 with BF16); checked before
    building them, which would take a minute for nothing elsewhere."""
    return bool(torch.cpu._is_avx512_bf16_supported())


def training_kernels() -> ModuleType | None:
    """lorakit's training kernels (csrc/training_kernels.cpp: attention, RMSNorm, SwiGLU, the LM head's softmax
    cross-entropy), built on first use; None on a CPU without AVX-512 BF16 or where they cannot be built."""
    if not cpu_runs_kernels():
        return None
    return extension("lorakit_training", TRAINING_SOURCES, "lorakit's training kernels",
                     "training with torch's operations")


@functools.cache
def extension(name: str, sources: tuple[str, ...], what: str, otherwise: str) -> ModuleType | None:
    """The extension `name` compiled from `sources` (files in csrc/), built on first use; None where it cannot be.
    `what` names it and `otherwise` says what runs instead, in the lines printed while building or failing."""
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None:  # the ninja package's binary sits beside this Python, not always on PATH
        with contextlib.suppress(ImportError):
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build = cache_dir() / "compiled" / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    if not (build / f"{name}.so").exists():
        print(f"lorakit: compiling {what} into {build} (once; about a minute)", file=sys.stderr, flush=True)
    try:
        build.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name, sources=[str(CSRC / s) for s in sources], extra_cflags=["-O2"],
                                  build_directory=str(build), verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the caller's torch path works everywhere
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])[:200]
        print(f"lorakit: {what} could not be built ({reason}); {otherwise}", file=sys.stderr, flush=True)
        return None
