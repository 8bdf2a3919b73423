"""Which backend serves which device, decided once at import, as data.

* CPU: the C++ kernels of ``bnas_fast._C`` when the extension is built, else the pure-PyTorch
  reference (with one warning saying why and how to build).
* CUDA: the Triton kernels when ``triton`` is installed, else the reference.

``BNAS_FAST_BACKEND=reference`` forces the reference everywhere (useful to bisect a wrong answer).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Dict, Optional

C_EXTENSION_ERROR: Optional[str] = None


def forced_backend() -> Optional[str]:
    forced = os.environ.get("BNAS_FAST_BACKEND", "").strip().lower()
    if forced in ("", "auto"):
        return None
    if forced != "reference":
        raise ValueError(
            f"BNAS_FAST_BACKEND={forced!r} is not understood: use 'reference' (force the pure-PyTorch "
            "reference) or leave it unset"
        )
    return forced


@functools.lru_cache(maxsize=None)
def has_c_extension() -> bool:
    """Imports bnas_fast._C once; its static initialisers register the CPU kernels."""
    global C_EXTENSION_ERROR
    try:
        importlib.import_module("bnas_fast._C")
        return True
    except ImportError as exc:
        C_EXTENSION_ERROR = str(exc)
        warnings.warn(
            f"bnas_fast: the C++ extension bnas_fast._C is not built ({exc}); CPU ops fall back to the "
            "pure-PyTorch reference. Build it with `pip install --no-build-isolation -e .` in the "
            "source tree.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def has_triton() -> bool:
    # find_spec does not import triton (about a second); the launchers import it on first use.
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def backends() -> Dict[str, str]:
    """{device type: backend name}, fixed at the first call (when the ops are registered)."""
    if forced_backend() == "reference":
        return {"cpu": "reference", "cuda": "reference"}
    return {
        "cpu": "cpp" if has_c_extension() else "reference",
        "cuda": "triton" if has_triton() else "reference",
    }
