"""Backend selection: which implementation of an op runs for a given device.

Backends:
    ``reference``  the plain-PyTorch / Python oracle beside every op, ``X_reference`` (always available)
    ``torch``      a fast path written in PyTorch (SDPA, oneDNN's Conv3d) where one beats the oracle
    ``triton``     the fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
    ``cpu``        the C++/OpenMP core in ``lungcore._C``
    ``cupy``       CUDA C++ compiled at run time through CuPy (volume ops)

Automatic choice: CUDA tensors -> Triton (or CuPy for volumes); CPU tensors -> the C++ core or the
``torch`` path where the op has one, else the reference. ``LUNGCORE_BACKEND=reference|torch|triton|cpu|cupy`` (or the
:func:`use_backend` context manager) forces a backend for every op that implements it; ops that
do not implement the forced backend keep their automatic choice, and :func:`count_launches`
tells a test which kernels really ran.

Example:
    >>> import lungcore.metrics  # registers concordance_index
    >>> lungcore.backend.backend_for("concordance_index", "cpu")
    'cpu'
    >>> with lungcore.backend.use_backend("reference"):
    ...     lungcore.backend.backend_for("concordance_index", "cpu")
    'reference'
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from lungcore.triton_kernels import _launch

BACKENDS = ("reference", "torch", "triton", "cpu", "cupy")
_DEFAULT_PREFERENCE = {"cuda": ("triton", "cupy", "reference"), "cpu": ("cpu", "reference")}


@dataclass(frozen=True)
class OpInfo:
    """What an op implements and the order in which the automatic choice tries its backends.

    Example:
        >>> import lungcore.metrics  # registers concordance_index
        >>> info = registered_ops()["concordance_index"]
        >>> sorted(info.backends), info.preference["cpu"]
        (['cpu', 'reference'], ('cpu', 'reference'))
    """

    name: str
    backends: frozenset[str]
    preference: dict[str, tuple[str, ...]]


_OPS: dict[str, OpInfo] = {}
_override = threading.local()


def register_op(name: str, backends: tuple[str, ...] | list[str],
                preference: dict[str, tuple[str, ...]] | None = None) -> OpInfo:
    """Declare op ``name`` with the backends it implements (``reference`` is implied).

    ``preference`` maps a device type (``"cpu"``, ``"cuda"``) to the order in which the automatic
    choice tries backends; the default is Triton/CuPy first on CUDA, C++ first on CPU. An op's
    module registers it on import, e.g. ``register_op("concordance_index", ("cpu",))``; a name
    registered again is replaced. A backend outside ``BACKENDS`` is refused before anything changes.

    Example:
        >>> register_op("my_op", ("triton", "tpu"))
        Traceback (most recent call last):
        ...
        ValueError: register_op('my_op'): unknown backends ['tpu']; known: ('reference', ...)
    """
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register_op({name!r}): unknown backends {sorted(unknown)}; known: {BACKENDS}")
    info = OpInfo(name, frozenset(backends) | {"reference"}, dict(preference or _DEFAULT_PREFERENCE))
    _OPS[name] = info
    return info


def registered_ops() -> dict[str, OpInfo]:
    """All registered ops by name (ops register when their module is imported); a copy.

    Example:
        >>> import lungcore.metrics  # registers concordance_index
        >>> registered_ops()["concordance_index"].name
        'concordance_index'
    """
    return dict(_OPS)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    The environment is read at each call (tests set it without a GPU, see ``tests/conftest.py``).

    Example:
        >>> import os
        >>> interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Availability probes run once per process. A plain dict memo (not functools.lru_cache) keeps
# them transparent to torch.compile, which traces backend_for and guards on what it reads.
_PROBES: dict[str, bool] = {}


def _probe_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _probe_cpp() -> bool:
    try:
        import lungcore._C  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_cupy() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return False


def _probed(name: str, probe) -> bool:
    if name not in _PROBES:
        _PROBES[name] = bool(probe())
    return _PROBES[name]


def triton_importable() -> bool:
    """True when the ``triton`` package is installed (it may still lack a GPU to run on).

    Probed once per process, like :func:`cpp_available` and :func:`cupy_available`.

    Example:
        >>> import importlib.util
        >>> triton_importable() == (importlib.util.find_spec("triton") is not None)
        True
    """
    return _probed("triton", _probe_triton)


def cpp_available() -> bool:
    """True when the compiled extension ``lungcore._C`` imports (the ``cpu`` backend).

    Example:
        >>> isinstance(cpp_available(), bool)
        True
    """
    return _probed("cpp", _probe_cpp)


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device (the ``cupy`` backend); False on a machine
    without either.

    Example:
        >>> isinstance(cupy_available(), bool)
        True
    """
    return _probed("cupy", _probe_cupy)


class BackendUnavailable(RuntimeError):
    """A backend forced by :func:`use_backend` or ``LUNGCORE_BACKEND`` cannot run where it was asked
    to (the ``lungcore`` command reports it in one line, exit 2).

    Example:
        >>> issubclass(BackendUnavailable, RuntimeError)
        True
    """


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``LUNGCORE_BACKEND`` (None = automatic).

    :func:`use_backend` beats the environment; ``ValueError`` for an unknown ``LUNGCORE_BACKEND``.

    Example:
        >>> with use_backend("reference"):
        ...     forced_backend()
        'reference'
    """
    value = getattr(_override, "value", None) or os.environ.get("LUNGCORE_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"LUNGCORE_BACKEND={value!r} is not one of {('auto',) + BACKENDS}")
    return value


def _available(backend: str, device_type: str) -> bool:
    if backend in ("reference", "torch"):
        return True
    if backend == "triton":
        return triton_importable() and (device_type == "cuda" or interpreting())
    if backend == "cpu":
        return cpp_available()
    if backend == "cupy":
        return device_type == "cuda" and cupy_available()
    return False


def _device_type(device: object) -> str:
    text = str(getattr(device, "type", device))
    return "cuda" if text.startswith("cuda") else "cpu"


def backend_for(op: str, device: object = "cpu") -> str:
    """The backend op ``op`` will use for inputs on ``device`` (a torch.device or its string).

    Raises :class:`BackendUnavailable` (a ``RuntimeError``) when a forced backend cannot run there (Triton on CPU tensors
    without ``TRITON_INTERPRET=1``), so a benchmark or test never measures the wrong path;
    ``KeyError`` for an op that was never registered.

    Example:
        >>> import lungcore.metrics  # registers concordance_index
        >>> with use_backend("reference"):
        ...     backend_for("concordance_index", "cpu")
        'reference'
        >>> backend_for("no_such_op")
        Traceback (most recent call last):
        ...
        KeyError: "unknown op 'no_such_op'; registered: [...]"
    """
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_OPS)}")
    info = _OPS[op]
    device_type = _device_type(device)
    forced = forced_backend()
    if forced is not None and forced in info.backends:
        if not _available(forced, device_type):
            raise BackendUnavailable(
                f"backend {forced!r} was forced for op {op!r} but cannot run on {device_type} here"
                + (" (set TRITON_INTERPRET=1 before importing lungcore to run Triton on CPU)"
                   if forced == "triton" else "")
            )
        return forced
    for backend in info.preference.get(device_type, ("reference",)):
        if backend in info.backends and _available(backend, device_type):
            return backend
    return "reference"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (or ``None``/``"auto"`` for automatic) in this thread, e.g. in a test.

    Example:
        >>> with use_backend("reference"):
        ...     pass
    """
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {('auto',) + BACKENDS}, got {name!r}")
    previous = getattr(_override, "value", None)
    _override.value = name if name not in (None, "auto") else None
    try:
        yield
    finally:
        _override.value = previous


def record_launch(kernel: str, n: int = 1) -> None:
    """Count ``n`` launches of ``kernel`` (``"<op>.<kernel>"``, e.g. ``"cox_ph_loss.scan_apply"``).

    Every kernel launcher (C++, Triton, CuPy) calls it once per launch; :func:`count_launches`
    and :func:`launch_counts` read the counts.

    Example:
        >>> with count_launches() as launches:
        ...     record_launch("docs_example.kernel", 2)
        >>> launches
        Counter({'docs_example.kernel': 2})
    """
    _launch.record(kernel, n)


def launch_counts() -> Counter[str]:
    """Launches of every kernel since the process started, by kernel name (a copy).

    Counts only grow; compare two snapshots, or use :func:`count_launches`, to see one block's.

    Example:
        >>> before = launch_counts()["docs_example.kernel"]
        >>> record_launch("docs_example.kernel")
        >>> launch_counts()["docs_example.kernel"] - before
        1
    """
    return _launch.snapshot()


@contextlib.contextmanager
def count_launches() -> Iterator[Counter[str]]:
    """Count kernel launches inside the block; the yielded Counter is filled on exit.

    Example:
        >>> with count_launches() as launches:
        ...     pass
        >>> sum(launches.values())
        0
    """
    before = _launch.snapshot()
    result: Counter[str] = Counter()
    try:
        yield result
    finally:
        after = _launch.snapshot()
        for kernel, n in after.items():
            if n - before.get(kernel, 0):
                result[kernel] = n - before.get(kernel, 0)
