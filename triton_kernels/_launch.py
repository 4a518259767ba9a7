"""Launch counter shared by every kernel launcher (Triton, CuPy, C++).

Launchers call :func:`record` once per kernel launch, so a test that forces a backend can
assert that the kernel really ran (on CPU the default path *is* the reference). Pure Python,
no Triton import, thread-safe enough for counting (a lock guards the Counter).
"""
from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def record(kernel: str, n: int = 1) -> None:
    """Count ``n`` launches of ``kernel`` (e.g. ``"cox.forward"``)."""
    with _lock:
        _counts[kernel] += n


def snapshot() -> Counter[str]:
    """A copy of the launch counts so far."""
    with _lock:
        return Counter(_counts)
