"""Launch counter shared by every kernel launcher (Triton, CuPy, C++).

Launchers call :func:`record` once per kernel launch, so a test that forces a backend can
assert that the kernel really ran (on CPU the default path *is* the reference). Pure Python,
no Triton import, thread-safe enough for counting (a lock guards the Counter).
"""
from __future__ import annotations

import threading
from collections import Counter

# Every launcher passes ``enable_fp_fusion=FP_FUSION``: a multiply feeding an add compiles to one
# FMA (one rounding instead of two; what Triton <= 3.9 does by default). Triton 3.9 warns that its
# default flips to off in 3.10; pinning it keeps the compiled code and its rounding the same on
# every Triton version the library supports.
FP_FUSION = True

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def record(kernel: str, n: int = 1) -> None:
    """Count ``n`` launches of ``kernel`` (``"<op>.<kernel>"``, e.g. ``"cox_ph_loss.scan_apply"``)."""
    with _lock:
        _counts[kernel] += n


def snapshot() -> Counter[str]:
    """A copy of the launch counts so far."""
    with _lock:
        return Counter(_counts)


# ----------------------------------------------------------------------------------------------
# grid sizing: the launchers size their grids for the GPU they run on (multiprocessor count).
# ``sizing_for`` lets a tool that calls them with CPU tensors (benchmarks.aot: ahead-of-time
# compiles without a GPU) get exactly the grids a GPU of that size would get.

_sizing = threading.local()


def multiprocessors(device) -> int | None:
    """Multiprocessors the launchers size grids for: the CUDA device's count, the count set by
    :func:`sizing_for` (any device), or None (CPU tensors in the interpreter: small grids)."""
    forced = getattr(_sizing, "sms", None)
    if forced is not None:
        return forced
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


class sizing_for:
    """Context manager: launchers size grids as for a GPU with ``sms`` multiprocessors.

    Example:
        >>> with sizing_for(132):
        ...     multiprocessors("cpu")
        132
    """

    def __init__(self, sms: int):
        self.sms = int(sms)

    def __enter__(self):
        self._previous = getattr(_sizing, "sms", None)
        _sizing.sms = self.sms
        return self

    def __exit__(self, *exc):
        _sizing.sms = self._previous
        return False
