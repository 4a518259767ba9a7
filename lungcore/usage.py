"""Checks of command-line arguments made before any work starts: output paths, devices, exit codes.

Every ``lungcore`` subcommand follows one convention (README, "Guarantees"):

- exit 0: done;
- exit 1: the data or the run failed (a manifest problem, an unreadable image, a non-finite loss);
- exit 2: usage error: an argument, file or output folder the command cannot use as given.

A usage problem is one line on stderr naming the argument or file; it is found before any work
(no inference first, no file written). Existing output is never replaced unless ``--overwrite``
says so.

The same checks guard the Python API (``lungcore.train.fit``, ``predict``, ``evaluate``), so a
message names the argument as its caller wrote it: the command-line flag inside
:func:`command_line` (where ``lungcore.cli.main`` runs every subcommand), the keyword argument
outside (``batch_size``, ``overwrite=True``): see :func:`argument`.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> out_folder(d / "new", "--out", overwrite=False)    # absent or empty: fine
    []
    >>> (d / "run").mkdir(); _ = (d / "run" / "metrics.csv").write_text("x")
    >>> out_folder(d / "run", "--out", overwrite=False)
    Traceback (most recent call last):
    ...
    lungcore.usage.UsageError: out .../run is not empty (metrics.csv); pass overwrite=True to replace it, or choose another folder
    >>> with command_line():                                # as lungcore's commands say it
    ...     out_folder(d / "run", "--out", overwrite=False)
    Traceback (most recent call last):
    ...
    lungcore.usage.UsageError: --out .../run is not empty (metrics.csv); pass --overwrite to replace it, or choose another folder
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """An argument, file or output the command cannot use as given (exit code 2)."""


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("lungcore_command_line", default=False)
# flags whose Python keyword is not the flag's name
_KEYWORDS = {"--cache": "cache_dir"}
_SWITCHES = ("overwrite", "resume")  # flags without a value: keyword arguments set to True


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within it, usage errors name command-line flags (``--batch-size``); ``lungcore.cli.main``
    runs every subcommand in it.

    Example:
        >>> with command_line():
        ...     argument("--batch-size")
        '--batch-size'
        >>> argument("--batch-size")
        'batch_size'
    """
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """True inside :func:`command_line` (a ``lungcore`` command), False for a Python caller.

    Example:
        >>> on_command_line()
        False
    """
    return _COMMAND_LINE.get()


def argument(flag: str) -> str:
    """How the caller spelled the argument of command-line ``flag``: the flag itself on the command
    line (inside :func:`command_line`), else the Python keyword (``--batch-size`` -> ``batch_size``;
    a switch: ``--overwrite`` -> ``overwrite=True``, ``--no-progress`` -> ``progress=False``).

    Example:
        >>> argument("--out"), argument("--overwrite"), argument("--no-progress"), argument("checkpoint")
        ('out', 'overwrite=True', 'progress=False', 'checkpoint')
    """
    if _COMMAND_LINE.get() or not flag.startswith("--"):
        return flag
    if flag in _KEYWORDS:
        return _KEYWORDS[flag]
    name = flag[2:].replace("-", "_")
    if name.startswith("no_"):
        return f"{name[3:]}=False"
    return f"{name}=True" if name in _SWITCHES else name


def _writable_dir(folder: Path, flag: str) -> None:
    """``folder`` (existing or not) can be created and written by this process."""
    probe = folder
    while not probe.exists():  # the deepest existing ancestor decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{argument(flag)} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{argument(flag)} {folder}: cannot write there (permission denied on {probe})")


def out_folder(folder: str | os.PathLike, flag: str = "--out", *, overwrite: bool = False,
               ignore: tuple[str, ...] = ()) -> list[str]:
    """Check that ``folder`` can be an output folder; return the names it already holds.

    A folder that holds anything (other than the names in ``ignore``) is refused with a
    :class:`UsageError` unless ``overwrite``; nothing is deleted here (the caller replaces its
    own outputs once every other check passed).
    """
    folder = Path(folder)
    _writable_dir(folder, flag)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.name not in ignore)
    if names and not overwrite:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UsageError(f"{argument(flag)} {folder} is not empty ({shown}); pass {argument('--overwrite')} to "
                         "replace it, or choose another folder")
    return names


def out_file(path: str | os.PathLike, flag: str = "--out", *, overwrite: bool = False) -> None:
    """Check that ``path`` can be written as a new file (an existing one only with ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{argument(flag)} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UsageError(f"{argument(flag)} {path} exists; pass {argument('--overwrite')} to replace it, "
                         "or choose another name")
    _writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{argument(flag)} {path}: cannot write there (permission denied)")


def device(name: str | None, flag: str = "--device") -> None:
    """``--device cuda`` on a machine without CUDA is a usage error (not an assertion deep inside)."""
    if name and str(name).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{argument(flag)} {name}: CUDA is not available on this machine "
                             f"(use {argument(flag)} cpu)")


def positive(values: Any, flag: str, *, integer: bool = False) -> None:
    """Every number in ``values`` is finite and > 0 (``--crop``, ``--spacing``, ``--batch-size``)."""
    if values is None:
        return
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    for v in items:
        if not (math.isfinite(v) and v > 0) or (integer and int(v) != v):
            kind = "positive integers" if integer else "positive numbers"
            shown = " ".join(str(x) for x in items)
            raise UsageError(f"{argument(flag)} {shown}: must be {kind}")


def is_integer(value: Any, minimum: int | None = None) -> bool:
    """``value`` is a whole number (``3`` or ``3.0``, not ``True``, NaN or ``"3"``), at least ``minimum``.

    The one rule behind every integer flag (:func:`integer`) and config field
    (``lungcore.train.config``).

    Example:
        >>> is_integer(3.0, 1), is_integer(0, 1), is_integer(True), is_integer(float("nan"))
        (True, False, False, False)
    """
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and float(value).is_integer() and (minimum is None or value >= minimum))


def is_boolean(value: Any) -> bool:
    """``value`` is a bool (Python's or numpy's), not a truthy stand-in such as ``"false"`` or ``1``.

    The one rule behind every boolean config field (``lungcore.train.config``) and network
    option (``lungcore.checks.boolean``).

    Example:
        >>> import numpy as np
        >>> is_boolean(False), is_boolean(np.bool_(True)), is_boolean("false"), is_boolean(1)
        (True, True, False, False)
    """
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def integer(value: Any, flag: str, minimum: int | None = None, *, note: str = "") -> int:
    """``value`` of integer flag ``flag`` as an int.

    Anything else is a :class:`UsageError`: ``"--workers must be an integer >= 1, got 0"`` on the
    command line, ``"workers must be ..."`` from Python (:func:`argument`; ``note`` follows the
    bound, e.g. ``" (0: torch's choice)"``).

    Example:
        >>> integer(4, "--workers", 1)
        4
        >>> integer(0, "--workers", 1)
        Traceback (most recent call last):
        ...
        lungcore.usage.UsageError: workers must be an integer >= 1, got 0
    """
    if not is_integer(value, minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise UsageError(f"{argument(flag)} must be an integer{bound}{note}, got {value!r}")
    return int(value)


def read_mapping(path: str | os.PathLike, what: str, *, fmt: str | None = None, of: str = "",
                 empty_ok: bool = False) -> dict[str, Any]:
    """The mapping a JSON or YAML file holds; any problem is an error naming ``what`` and the file.

    ``fmt`` is ``"json"`` or ``"yaml"``; by default a ``.yaml``/``.yml`` suffix means YAML and
    anything else JSON. A missing file raises ``FileNotFoundError``; bytes that are not UTF-8, a
    syntax error (with its line and column) or content that is not a mapping raise ``ValueError``:
    ``"config file run.yaml is not valid YAML: expected ',' or ']' (line 2 column 1)"``. ``of``
    follows "must hold a mapping" (``" of TrainConfig fields"``); an empty file is ``{}`` when
    ``empty_ok``. The one reader of lungcore's schema and config files.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = f.write_text("epochs: 3\\n")
        >>> read_mapping(f, "config file")
        {'epochs': 3}
        >>> _ = f.write_text("epochs: [3\\n")
        >>> read_mapping(f, "config file")
        Traceback (most recent call last):
        ...
        ValueError: config file .../c.yaml is not valid YAML: expected ',' or ']', but got '<stream end>' (line 2 column 1)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    fmt = fmt or ("yaml" if path.suffix.lower() in (".yaml", ".yml") else "json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text: byte {exc.start} is "
                         f"{exc.object[exc.start:exc.start + 1]!r}") from None
    if fmt == "yaml":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1} column {mark.column + 1})" if mark is not None else ""
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{what} {path} is not valid YAML: {reason}{where}") from None
    else:
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = exc.msg.removesuffix(" at")  # "Invalid control character at"
            raise ValueError(f"{what} {path} is not valid JSON: {reason} "
                             f"(line {exc.lineno} column {exc.colno})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping{of}")
    return data


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as None, so ``json.dumps`` writes valid JSON (``null``)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
