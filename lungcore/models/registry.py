"""Model registry shared by both networks, and safe save/load of weights + configuration.

A network registers itself with :func:`register_model`; it must define ``config_class`` (a
dataclass whose defaults reproduce its paper) and take that config as its only constructor
argument. Checkpoints are plain dicts of tensors and primitives saved with ``torch.save`` and
read with ``torch.load(weights_only=True)``: loading a checkpoint can never run code.

The training contract every registered network follows (``lungcore.train`` relies on it):

    task: str                      # "survival" (risks per endpoint) or "classification" (logits)
    stages: tuple[str, ...]        # e.g. ("pretrain", "finetune") for CMML, ("train",) for CSF-Net
    def loss(self, batch: dict, stage: str) -> tuple[Tensor, dict[str, float]]
        # batch = the dict of tensors of DESIGN.md ("Tensors between the data layer and the
        # models"), as lungcore.data's CohortDataset collates it; returns the scalar to minimise
        # and named scalars to log
    def predict(self, batch: dict) -> dict[str, Tensor]
        # per-patient outputs in eval mode: {"pfs": (B,), "os": (B,)} risks (the endpoints the
        # model was built for), or {"logits": (B, 2), "probability": (B,)}
    needs_images: bool             # False: a cohort without any CT still trains (CMML)
    @classmethod
    def config_from_cohort(cls, schema, settings, overrides=None) -> dict
        # the config fields the cohort sets (fitted CohortSchema, PreprocessSettings) with the
        # user's ``overrides`` over them; a contradiction raises ValueError naming both

Example:
    >>> from lungcore.models import available_models
    >>> isinstance(available_models(), list)
    True
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])
CHECKPOINT_FORMAT = 1


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make ``create(name)`` build this network (for the rest of the process).

    The class needs a dataclass ``config_class`` (taken as its only constructor argument) and the
    classmethod ``config_from_cohort(schema, settings, overrides=None)``; anything else is refused.

    Example:
        >>> import dataclasses, torch
        >>> @dataclasses.dataclass
        ... class LinearRiskConfig:
        ...     width: int = 4
        >>> @register_model("linear_risk")
        ... class LinearRisk(torch.nn.Module):
        ...     config_class = LinearRiskConfig
        ...     def __init__(self, config: LinearRiskConfig) -> None:
        ...         super().__init__()
        ...         self.config, self.fc = config, torch.nn.Linear(config.width, 1)
        ...     @classmethod
        ...     def config_from_cohort(cls, schema, settings, overrides=None):
        ...         return dict(overrides or {})
        >>> create("linear_risk", width=3).fc
        Linear(in_features=3, out_features=1, bias=True)
        >>> register_model("plain")(torch.nn.Linear)
        Traceback (most recent call last):
        ...
        TypeError: register_model('plain'): Linear.config_class must be a dataclass
    """
    def wrap(cls: M) -> M:
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"register_model({name!r}): {cls.__name__}.config_class must be a dataclass")
        if not callable(getattr(cls, "config_from_cohort", None)):
            raise TypeError(f"register_model({name!r}): {cls.__name__} must define the classmethod "
                            "config_from_cohort(schema, settings, overrides=None)")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls
    return wrap


def _import_networks() -> None:
    # networks register on import; importing here keeps `create` usable without extra imports
    import importlib
    import pkgutil

    import lungcore.models as models

    for mod in pkgutil.iter_modules(models.__path__):
        if mod.name not in ("registry",):
            importlib.import_module(f"lungcore.models.{mod.name}")


def available_models() -> list[str]:
    """Names accepted by :func:`create`, sorted.

    Example:
        >>> available_models()      # the two networks (and any registered since: register_model)
        ['cmml', 'csfnet'...]
    """
    _import_networks()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
    _import_networks()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def create(name: str, **overrides: Any) -> nn.Module:
    """Build network ``name`` with its paper defaults, overriding config fields by keyword.

    Example:
        >>> create("no-such-net")
        Traceback (most recent call last):
        ...
        ValueError: unknown model 'no-such-net'; available: ...
    """
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create({name!r}): unknown config fields {unknown}; known: {sorted(fields)}")
    return cls(cls.config_class(**overrides))


def contradiction(field: str, value: Any, source: str, cohort_value: Any, why: str) -> ValueError:
    """The error for a model config value (``model_overrides.<field>``) that the cohort contradicts.

    Example:
        >>> print(contradiction("img_size", [8, 8, 8], "data.preprocess.crop", (16, 64, 64), "why"))
        model_overrides.img_size = (8, 8, 8) contradicts data.preprocess.crop = (16, 64, 64) (why); make them agree or drop one
    """
    plain = tuple(value) if isinstance(value, list) else value
    return ValueError(f"model_overrides.{field} = {plain} contradicts {source} = {cohort_value} ({why}); "
                      "make them agree or drop one")


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's config as plain JSON-able data."""
    return dataclasses.asdict(model.config)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write weights + config (+ ``extra``: schema, preprocessing, metrics ...) atomically.

    ``extra`` must hold only tensors and primitives (dict/list/str/int/float/bool/None), so the
    file loads with ``weights_only=True``. Returns ``path``; missing folders are created.

    Example:
        >>> import os, tempfile
        >>> from lungcore.models.csfnet import CSFNetConfig
        >>> net = create("csfnet", **CSFNetConfig.tiny_overrides())
        >>> path = save_model(net, os.path.join(tempfile.mkdtemp(), "run", "best.pt"), extra={"epoch": 3})
        >>> path.name, read_checkpoint(path)["extra"]
        ('best.pt', {'epoch': 3})
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": getattr(model, "model_name", type(model).__name__),
        "config": config_dict(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return write_checkpoint(payload, path)


def write_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (a temporary name in the same folder, then a
    rename): a killed write never leaves a half checkpoint under the real name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line (``exc`` stays chained)."""
    with open(path, "rb") as f:
        head = f.read(4)
    refused = "weights only load failed" in str(exc).lower()  # torch's weights_only unpickler said no
    objects = ("it holds Python objects other than tensors and plain data, which lungcore never loads "
               "(loading them could run code)")
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":  # torch.save's format
        return objects if refused else "torch.save's zip archive is damaged or cut short, e.g. by an interrupted copy"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format or pickle.dump
        return objects if refused else "a pickle that cannot be read (damaged or cut short?)"
    return "not a file written by torch.save: it starts with neither a zip nor a pickle header"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``) with clear errors.

    The dict holds ``format``, ``model`` (the registered name), ``config``, ``state_dict`` and
    ``extra`` (see :func:`save_model`); :func:`load_model` builds the network from it.

    Example:
        >>> import os, tempfile
        >>> from lungcore.models.csfnet import CSFNetConfig
        >>> folder = tempfile.mkdtemp()
        >>> path = save_model(create("csfnet", **CSFNetConfig.tiny_overrides()), os.path.join(folder, "best.pt"))
        >>> ckpt = read_checkpoint(path)
        >>> sorted(ckpt), ckpt["model"], ckpt["config"]["dim"]
        (['config', 'extra', 'format', 'model', 'state_dict'], 'csfnet', 16)
        >>> read_checkpoint(folder)
        Traceback (most recent call last):
        ...
        ValueError: checkpoint ... is a folder, not a checkpoint file; it holds best.pt: pass .../best.pt
        >>> _ = open(os.path.join(folder, "notes.pt"), "w").write("not a checkpoint")
        >>> read_checkpoint(os.path.join(folder, "notes.pt"))
        Traceback (most recent call last):
        ...
        ValueError: checkpoint .../notes.pt is corrupt or not a lungcore checkpoint (not a file written by
        torch.save: it starts with neither a zip nor a pickle header)
    """
    path = Path(path)
    if path.is_dir():
        held = sorted(p.name for p in path.glob("*.pt") if p.is_file())
        held = [n for n in ("best.pt", "last.pt") if n in held] + [n for n in held if n not in ("best.pt", "last.pt")]
        hint = (f"; it holds {', '.join(held)}: pass {path / held[0]}" if held else
                "; pass a .pt file written by lungcore train (e.g. <run folder>/best.pt)")
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own text is many lines about weights_only: say what the file is
        raise ValueError(f"checkpoint {path} is corrupt or not a lungcore checkpoint ({_unreadable(path, exc)})") \
            from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "model" not in payload:
        raise ValueError(f"checkpoint {path} is not a lungcore checkpoint (no model/state_dict)")
    return payload


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(model, extra) from a checkpoint written by :func:`save_model`; never executes code.

    Example:
        >>> import os, tempfile
        >>> from lungcore.models.csfnet import CSFNetConfig
        >>> path = save_model(create("csfnet", **CSFNetConfig.tiny_overrides()),
        ...                   os.path.join(tempfile.mkdtemp(), "net.pt"), extra={"note": "tiny"})
        >>> model, extra = load_model(path)
        >>> type(model).__name__, extra["note"]
        ('CSFNet', 'tiny')
    """
    payload = read_checkpoint(path)
    try:
        cls = model_class(payload["model"])
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    try:
        model = cls(cls.config_class(**payload["config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: its {payload['model']} config does not fit this lungcore "
                         f"({exc})") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"checkpoint {path}: its weights do not fit its {payload['model']} config "
                         f"({' '.join(line.strip() for line in first[:3])})") from None
    return model, payload.get("extra", {})
