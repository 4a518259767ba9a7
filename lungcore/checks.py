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

import math
from collections.abc import Iterable, Sequence, Sized
from typing import Any

import numpy as np
import torch

from lungcore import usage

ArrayLike = Any  # numpy array, torch tensor (CPU or CUDA), CuPy array, or a sequence


def to_host(name: str, values: ArrayLike, dtype: Any = None) -> np.ndarray:
    """``values`` as a numpy array on the host: torch tensors (detached, copied from CUDA; bfloat16,
    which numpy lacks, as float32), CuPy arrays, numpy arrays and (nested) sequences; ``TypeError``
    naming ``name`` otherwise.

    Example:
        >>> import torch
        >>> to_host("time", torch.tensor([1.0, 2.0]))
        array([1., 2.], dtype=float32)
        >>> to_host("time", [[1, 2], [3]])
        Traceback (most recent call last):
        ...
        TypeError: time must be array-like numbers, got list
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu")
        if values.dtype == torch.bfloat16:
            values = values.float()  # exact: every bfloat16 is a float32
    elif hasattr(values, "__cuda_array_interface__") and hasattr(values, "get"):
        values = values.get()  # CuPy
    try:
        if isinstance(values, torch.Tensor):
            values = values.numpy()
        return np.asarray(values, dtype=dtype)
    except Exception as exc:  # ragged lists, strings, unconvertible objects
        raise TypeError(f"{name} must be array-like numbers, got {type(values).__name__}") from exc


def host_1d(name: str, values: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    """``values`` as a contiguous 1-D numpy array of ``dtype`` on the host.

    Accepts numpy arrays, torch tensors (detached, copied from CUDA), CuPy arrays and sequences.

    Example:
        >>> host_1d("time", [1, 2])
        array([1., 2.])
        >>> host_1d("time", [[1, 2]])
        Traceback (most recent call last):
        ...
        ValueError: time must be 1-D, got shape (1, 2)
    """
    array = to_host(name, values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def same_length(**arrays: Sized) -> int:
    """The common length of the named arrays; ``ValueError`` naming them when they differ.

    Example:
        >>> same_length(time=[1.0, 2.0], event=[0, 1])
        2
        >>> same_length(time=[1.0, 2.0], event=[0, 1, 1])
        Traceback (most recent call last):
        ...
        ValueError: time, event must have the same length; time has 2, event has 3
    """
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise ValueError(f"{', '.join(lengths)} must have the same length; {detail}")
    return next(iter(lengths.values()), 0)


def _first_bad(name: str, mask: np.ndarray) -> tuple[tuple[int, ...], str]:
    """The index of the first True entry of ``mask`` (any number of axes) and the entry's name: ``x[1, 0]``."""
    at = tuple(int(i) for i in np.argwhere(mask)[0])
    return at, f"{name}[{', '.join(map(str, at))}]" if at else name


def finite(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` unchanged; ``ValueError`` naming the first NaN/inf entry (by its index on every axis).

    Example:
        >>> import numpy as np
        >>> finite("risk", np.array([0.5, 1.0]))
        array([0.5, 1. ])
        >>> finite("risk", np.array([0.5, np.nan, np.inf]))
        Traceback (most recent call last):
        ...
        ValueError: risk[1] is nan: risk must be finite (2 bad values)
        >>> finite("risk", np.array([[0.5, 1.0], [np.inf, 2.0]]))
        Traceback (most recent call last):
        ...
        ValueError: risk[1, 0] is inf: risk must be finite (1 bad values)
    """
    bad = ~np.isfinite(array)
    if bad.any():
        at, entry = _first_bad(name, bad)
        raise ValueError(f"{entry} is {array[at]}: {name} must be finite ({int(bad.sum())} bad values)")
    return array


def nonnegative(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` unchanged; ``ValueError`` naming the first negative entry (by its index on every axis).

    Example:
        >>> import numpy as np
        >>> nonnegative("time", np.array([0.0, 3.0]))
        array([0., 3.])
        >>> nonnegative("time", np.array([2.0, -3.0]))
        Traceback (most recent call last):
        ...
        ValueError: time[1] is negative (-3.0): time must be >= 0
    """
    bad = array < 0
    if bad.any():
        at, entry = _first_bad(name, bad)
        raise ValueError(f"{entry} is negative ({array[at]}): {name} must be >= 0")
    return array


def binary(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` (bool, or numbers that are all 0/1) as a 1-D numpy bool array.

    Example:
        >>> binary("event", [1, 0, 1])
        array([ True, False,  True])
        >>> binary("event", [1, 2])
        Traceback (most recent call last):
        ...
        ValueError: event[1] is 2.0: event must be 0/1 (or bool)
    """
    array = host_1d(name, values, dtype=np.float64)
    bad = (array != 0) & (array != 1)
    if bad.any():
        at, entry = _first_bad(name, bad)
        raise ValueError(f"{entry} is {array[at]}: {name} must be 0/1 (or bool)")
    return array.astype(bool)


def survival_arrays(risk: ArrayLike, time: ArrayLike, event: ArrayLike,
                    risk_name: str = "risk") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated host copies of (risk, time, event): float64, float64 >= 0, bool; same length.

    Example:
        >>> survival_arrays([0.2, 0.9], [5, 3], [1, 0])
        (array([0.2, 0.9]), array([5., 3.]), array([ True, False]))
        >>> survival_arrays([0.2, 0.9], [5, -3], [1, 0])
        Traceback (most recent call last):
        ...
        ValueError: time[1] is negative (-3.0): time must be >= 0
    """
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
    """Check ``value.shape`` against ``expected`` (``None`` = any size on that axis); ``value`` unchanged.

    Example:
        >>> shape("q", torch.zeros(2, 4, 8), (None, 4, 8)).shape
        torch.Size([2, 4, 8])
        >>> shape("q", torch.zeros(2, 4, 8), (None, 4, 16))
        Traceback (most recent call last):
        ...
        ValueError: q must have shape (*, 4, 16), got (2, 4, 8)
    """
    actual = tuple(value.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {actual}")
    return value


def finite_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` unchanged; ``ValueError`` when a floating tensor holds NaN/inf (one device sync; use
    off the hot path).

    Example:
        >>> finite_tensor("x", torch.ones(3)).shape
        torch.Size([3])
        >>> finite_tensor("x", torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        ValueError: x holds NaN or inf values
    """
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or inf values")
    return value


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is in ``allowed``, else ``ValueError`` listing the choices.

    Example:
        >>> one_of("ties", "efron", ("efron", "breslow"))
        'efron'
        >>> one_of("ties", "cox", ("efron", "breslow"))
        Traceback (most recent call last):
        ...
        ValueError: ties must be one of ('efron', 'breslow'), got 'cox'
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``ValueError``: a string such as ``"false"`` (a quoted YAML
    value) is truthy in Python and would silently mean true.

    Example:
        >>> boolean("t1_only", False)
        False
        >>> boolean("t1_only", "false")
        Traceback (most recent call last):
        ...
        ValueError: t1_only must be true or false, got 'false'
    """
    if not usage.is_boolean(value):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def finite_number(name: str, value: Any) -> float:
    """``value`` as a finite float; ``TypeError``/``ValueError`` naming ``name`` otherwise (bools and
    strings, even ``"3"``, are not numbers).

    Example:
        >>> finite_number("fill", -1024)
        -1024.0
        >>> finite_number("fill", float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: fill must be finite, got nan
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):  # math, not numpy: plain Python that torch.compile traces as a constant
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


# ----------------------------------------------------------------------------------------------
# volumes and grids (resample_volume, resample_crop, the data layer)

def _plain_floats(value: Any) -> float | tuple[float, ...] | None:
    """``value`` as Python floats when it is a plain ``int``/``float`` or a flat list/tuple of them
    (bools excluded), else ``None``: the numpy-free form of the checks below, which torch.compile
    traces without a graph break (numpy calls there become tensors and data-dependent branches)."""
    try:
        if type(value) in (int, float):
            return float(value)
        if type(value) in (list, tuple) and all(type(v) in (int, float) for v in value):
            return tuple(float(v) for v in value)
    except OverflowError:  # an int beyond float64: the numpy path words the error
        pass
    return None


def spacing3(name: str, value: Any, allow_scalar: bool = False) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) in mm: 3 finite numbers > 0 (or one number when ``allow_scalar``).

    Plain Python numbers are checked without numpy (torch.compile traces the check).

    Example:
        >>> spacing3("new_spacing", 1.0, allow_scalar=True)
        (1.0, 1.0, 1.0)
    """
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be 3 numbers (z, y, x) in mm, got {value!r}")
    plain = _plain_floats(value)
    if plain is None:
        arr = to_host(name, value, dtype=np.float64)
        plain = float(arr) if arr.ndim == 0 else arr
    if isinstance(plain, float):
        if not allow_scalar:
            raise ValueError(f"{name} must be 3 numbers (z, y, x) in mm, got a scalar {value!r}")
        plain = (plain, plain, plain)
    shape = plain.shape if isinstance(plain, np.ndarray) else (len(plain),)
    if shape != (3,):
        raise ValueError(f"{name} must be 3 numbers (z, y, x) in mm, got shape {shape}")
    values = tuple(float(v) for v in plain)
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be finite and > 0 on every axis, got {values}")
    return values  # type: ignore[return-value]


def size3(name: str, value: Any) -> tuple[int, int, int]:
    """3 positive integers (D, H, W), or one int for a cube.

    Example:
        >>> size3("size", 16)
        (16, 16, 16)
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        sizes = tuple(int(v) for v in value)
        whole = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be 3 positive integers (D, H, W), got {value!r}") from exc
    if len(sizes) != 3 or not whole or min(sizes) < 1:
        raise ValueError(f"{name} must be 3 positive integers (D, H, W) in output voxels, got {value!r}")
    return sizes  # type: ignore[return-value]


def point_rows(name: str, value: Any, shape: Sequence[int]) -> list[tuple[float, float, float]]:
    """:func:`points_in_volume` as a list of (z, y, x) float tuples; a list of plain Python numbers
    is checked without numpy (torch.compile traces the check).

    Example:
        >>> point_rows("centers", [2, 2, 3], (4, 5, 6))
        [(2.0, 2.0, 3.0)]
    """
    rows = None
    if type(value) in (list, tuple) and value:
        flat = _plain_floats(value)
        if flat is not None and len(flat) == 3:
            rows = [flat]
        elif flat is None:
            rows = [_plain_floats(row) if type(row) in (list, tuple) else None for row in value]
            if not all(row is not None and len(row) == 3 for row in rows):
                rows = None
    if rows is None:
        points = to_host(name, value, dtype=np.float64)
        if points.ndim == 1 and points.shape[0] == 3:
            points = points[None]
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"{name} must have shape (N, 3) (z, y, x input voxel indices), got {points.shape}")
        rows = [tuple(row) for row in points.tolist()]
    for i, row in enumerate(rows):
        if not all(math.isfinite(c) for c in row):
            raise ValueError(f"{name}[{i}] is {list(row)}: {name} must be finite")
    for i, row in enumerate(rows):
        if any(c < -0.5 or c > float(n) - 0.5 for c, n in zip(row, shape)):
            raise ValueError(f"{name}[{i}] = {list(row)} lies outside the volume of shape {tuple(shape)} "
                             f"(valid input indices are [-0.5, n - 0.5] per axis)")
    return rows  # type: ignore[return-value]


def points_in_volume(name: str, value: Any, shape: Sequence[int]) -> np.ndarray:
    """(N, 3) float64 voxel indices (z, y, x) inside a volume of ``shape`` ([-0.5, n - 0.5] per axis);
    a single point (3,) becomes (1, 3). The error names the first bad row. Vectorised with numpy
    (10,000 points: ~0.2 ms); :func:`point_rows` is the same check in plain Python, row by row (~30
    ms for 10,000; what torch.compile traces): the same values, the same errors.

    Example:
        >>> points_in_volume("centers", [2, 2, 3], (4, 5, 6))
        array([[2., 2., 3.]])
        >>> points_in_volume("centers", [[2, 2, 3], [4, 0, 0]], (4, 5, 6))
        Traceback (most recent call last):
        ...
        ValueError: centers[1] = [4.0, 0.0, 0.0] lies outside the volume of shape (4, 5, 6) (valid input ...)
    """
    points = to_host(name, value, dtype=np.float64)
    if points.ndim == 1 and points.shape[0] == 3:
        points = points[None]
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) (z, y, x input voxel indices), got {points.shape}")
    if not np.isfinite(points).all():  # one reduction when all is well, the row only to word the error
        at, entry = _first_bad(name, ~np.isfinite(points).all(axis=1))
        raise ValueError(f"{entry} is {points[at].tolist()}: {name} must be finite")
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    if not ((points >= -0.5) & (points <= upper)).all():
        at, entry = _first_bad(name, ((points < -0.5) | (points > upper)).any(axis=1))
        raise ValueError(f"{entry} = {points[at].tolist()} lies outside the volume of shape {tuple(shape)} "
                         f"(valid input indices are [-0.5, n - 0.5] per axis)")
    return points


def hu_window(name: str, value: Any) -> tuple[float, float] | None:
    """``None`` or a finite (low, high) HU window with low < high, as floats.

    Example:
        >>> hu_window("window", (-1000, 400))
        (-1000.0, 400.0)
        >>> hu_window("window", (400, -1000))
        Traceback (most recent call last):
        ...
        ValueError: window must be finite (low, high) with low < high, got (400, -1000)
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)):  # "12" would unpack to (1.0, 2.0)
        raise TypeError(f"{name} must be (low, high) in HU, got {value!r}")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be (low, high) in HU, got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"{name} must be finite (low, high) with low < high, got {value!r}")
    return lo, hi


def interpolation_order(name: str, value: Any) -> int:
    """0 (nearest), 1 (linear) or 3 (cubic B-spline) as an int; bools are refused.

    Example:
        >>> interpolation_order("order", 3)
        3
        >>> interpolation_order("order", 2)
        Traceback (most recent call last):
        ...
        ValueError: order must be one of (0, 1, 3), got 2
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be one of (0, 1, 3), got {value!r}")
    return int(one_of(name, value, (0, 1, 3)))


# the dtypes the volume kernels read, and what other inputs become first
VOLUME_DTYPES = tuple(np.dtype(d) for d in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64))
_VOLUME_PROMOTE = {np.dtype(np.bool_): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


def volume_dtype(name: str, dtype: Any) -> np.dtype:
    """The numpy dtype a volume kernel reads for a volume of ``dtype`` (numpy or torch; bool ->
    uint8, float16/bfloat16 -> float32); ``TypeError`` for anything else.

    Example:
        >>> volume_dtype("volume", torch.bool), volume_dtype("volume", torch.bfloat16)
        (dtype('uint8'), dtype('float32'))
        >>> volume_dtype("volume", torch.complex64)
        Traceback (most recent call last):
        ...
        TypeError: volume dtype must be one of int8, uint8, ..., float64 or bool, got torch.complex64
    """
    if dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.float32)
    dt = numpy_dtype(name, dtype)
    dt = _VOLUME_PROMOTE.get(dt, dt)
    if dt not in VOLUME_DTYPES:
        raise TypeError(f"{name} dtype must be one of int8, uint8, int16, uint16, int32, float16, bfloat16, "
                        f"float32, float64 or bool, got {dtype}")
    return dt


def volume_torch_dtype(name: str, dtype: Any) -> torch.dtype:
    """:func:`volume_dtype` as a torch dtype; for a torch ``dtype`` a plain table lookup without numpy
    (torch.compile traces it), the same ``TypeError`` otherwise.

    Example:
        >>> volume_torch_dtype("volume", torch.bool), volume_torch_dtype("volume", torch.float16)
        (torch.uint8, torch.float32)
    """
    if isinstance(dtype, torch.dtype) and dtype in _VOLUME_TORCH:
        return _VOLUME_TORCH[dtype]
    return torch_dtype(volume_dtype(name, dtype))


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch twin of a numpy dtype (``TypeError`` where torch has none).

    Example:
        >>> import numpy as np
        >>> torch_dtype(np.dtype(np.int16))
        torch.int16
    """
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


# volume_dtype for torch dtypes, as a table (every accepted torch dtype; the rest go through numpy)
_VOLUME_TORCH = {torch_dtype(d): torch_dtype(d) for d in VOLUME_DTYPES}
_VOLUME_TORCH.update({torch.bool: torch.uint8, torch.float16: torch.float32, torch.bfloat16: torch.float32})


def numpy_dtype(name: str, dtype: Any) -> np.dtype:
    """``dtype`` (numpy or torch) as a numpy dtype; ``TypeError`` naming ``name`` when it has none
    (torch.bfloat16 has no numpy twin).

    Example:
        >>> numpy_dtype("out_dtype", torch.float32)
        dtype('float32')
        >>> numpy_dtype("out_dtype", torch.bfloat16)
        Traceback (most recent call last):
        ...
        TypeError: out_dtype must be a numpy or torch dtype with a numpy equivalent, got torch.bfloat16
    """
    try:
        if isinstance(dtype, torch.dtype):
            return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
        return np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be a numpy or torch dtype with a numpy equivalent, got {dtype!r}") from exc
