"""Input checks shared by every op and metric (no op grows its own copy).

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument, so a user
sees ``"time[17] is negative (-3.0)"`` rather than a crash inside a kernel.

Example:
    >>> import numpy as np
    >>> from lungcore import checks
    >>> checks.host_1d("time", [1.0, 2.0]).dtype
    dtype('float64')
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor (CPU or CUDA), CuPy array, or a sequence


def host_1d(name: str, values: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    """``values`` as a contiguous 1-D numpy array of ``dtype`` on the host.

    Accepts numpy arrays, torch tensors (detached, copied from CUDA), CuPy arrays and sequences.
    """
    if isinstance(values, torch.Tensor):
        array = values.detach().to("cpu").numpy()
    elif hasattr(values, "__cuda_array_interface__") and hasattr(values, "get"):
        array = values.get()  # CuPy
    else:
        try:
            array = np.asarray(values)
        except Exception as exc:  # ragged lists, unconvertible objects
            raise TypeError(f"{name} must be array-like, got {type(values).__name__}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def same_length(**arrays: Sized) -> int:
    """The common length of the named arrays; ``ValueError`` naming them when they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise ValueError(f"{', '.join(lengths)} must have the same length; {detail}")
    return next(iter(lengths.values()), 0)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def finite(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` unchanged; ``ValueError`` naming the first NaN/inf entry."""
    bad = ~np.isfinite(array)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}[{i}] is {array[i]}: {name} must be finite ({int(bad.sum())} bad values)")
    return array


def nonnegative(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` unchanged; ``ValueError`` naming the first negative entry."""
    bad = array < 0
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}[{i}] is negative ({array[i]}): {name} must be >= 0")
    return array


def binary(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` (bool, or numbers that are all 0/1) as a 1-D numpy bool array."""
    array = host_1d(name, values, dtype=np.float64)
    bad = (array != 0) & (array != 1)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}[{i}] is {array[i]}: {name} must be 0/1 (or bool)")
    return array.astype(bool)


def survival_arrays(risk: ArrayLike, time: ArrayLike, event: ArrayLike,
                    risk_name: str = "risk") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated host copies of (risk, time, event): float64, float64 >= 0, bool; same length."""
    r = finite(risk_name, host_1d(risk_name, risk))
    t = nonnegative("time", finite("time", host_1d("time", time)))
    e = binary("event", event)
    same_length(**{risk_name: r, "time": t, "event": e})
    return r, t, e


def tensor(name: str, value: Any, *, ndim: int | Iterable[int] | None = None,
           dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Check that ``value`` is a torch.Tensor with the given rank, dtype and device.

    Example:
        >>> tensor("q", torch.zeros(2, 3), ndim=2).shape
        torch.Size([2, 3])
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device} (same device as the other inputs)")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int | None]) -> torch.Tensor:
    """Check ``value.shape`` against ``expected`` (``None`` = any size on that axis)."""
    actual = tuple(value.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {actual}")
    return value


def finite_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """``ValueError`` when a floating tensor holds NaN/inf (one device sync; use off the hot path)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or inf values")
    return value


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is in ``allowed``, else ``ValueError`` listing the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
