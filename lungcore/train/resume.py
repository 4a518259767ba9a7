"""What ``--resume`` restores, and what a command line may (not) change when it does.

A resumed run takes its configuration from ``last.pt`` (the config the run was started with),
not from the defaults of the command line. A flag or config field that contradicts the saved
config is a :class:`~lungcore.usage.UsageError` naming the flag, raised before anything in the
run folder changes. The exceptions, documented in the README:

- ``epochs`` may grow: the stage being trained (the last one, when the run finished) continues
  to the new count, its learning-rate schedule stretched to the new length, and the stages after
  it run the new count too (``--epochs`` is the count of every stage still to train: it replaces
  their ``stage_epochs``, and may not be below any of them);
- ``progress``, ``num_workers`` and ``device`` may change (they do not change what is learnt,
  except for the last bits of floating point between devices).

A saved ``stage_epochs`` entry that is no stage of the run's model (a run saved before dicts
were checked per model: ``lungcore demo`` gave CMML and CSF-Net one mapping) never counted and is
dropped; a config given on resume is checked as on a fresh run.

A run whose every stage is done and whose test report was written is *finished*: resuming it is a
:class:`RunFinished` error unless ``epochs`` grows.

Example:
    >>> saved = {"epochs": 3, "data": {"manifest": "m.csv", "batch_size": 4}}
    >>> contradictions(saved, {"epochs": None, "batch_size": 4, "manifest": "m.csv"})
    []
    >>> contradictions(saved, {"epochs": 10, "batch_size": 8})
    ['batch_size 8 (the run was started with data.batch_size 4)']
    >>> from lungcore.usage import command_line
    >>> with command_line():                      # what `lungcore train --resume` says
    ...     contradictions(saved, {"epochs": 10, "batch_size": 8})
    ['--batch-size 8 (the run was started with data.batch_size 4)']
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lungcore import usage
from lungcore.usage import UsageError

# keyword of fit() (a command-line flag with - for _) -> its place in TrainConfig.to_dict()
OVERRIDE_PATHS = {"manifest": "data.manifest", "schema": "data.schema", "batch_size": "data.batch_size",
                  "num_workers": "data.num_workers", "cache_dir": "data.cache_dir", "verify": "data.verify",
                  "lr": "optim.lr", "accumulate": "optim.accumulate", "augment": "data.augment"}
MAY_CHANGE = {"progress", "num_workers", "device", "data.num_workers"}
# the data paths a run saves absolute (fit); one saved relative (a run started before they were) was
# relative to the directory the run was started in, which resume cannot know
PATH_FIELDS = ("manifest", "schema", "cache_dir")


class RunFinished(UsageError):
    """``--resume`` of a run that has nothing left to do."""


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _same(a: Any, b: Any, key: str) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], key) for k in a)
    if key in {OVERRIDE_PATHS[name] for name in PATH_FIELDS} and a is not None and b is not None:
        return _same_path(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, key) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _same_path(given: Any, saved: Any) -> bool:
    """A path given now names the saved one: the same file, or (a saved relative path, relative to
    wherever the run was started) a path ending in the saved one's parts."""
    g = Path(given).resolve()
    if g == Path(saved).resolve():
        return True
    rel = Path(saved)
    return not rel.is_absolute() and ".." not in rel.parts and g.parts[-len(rel.parts):] == rel.parts


def contradictions(saved: dict[str, Any], overrides: dict[str, Any], *, where: str = "",
                   longer: bool = True) -> list[str]:
    """Each override (fit keyword or dotted config path -> value; None = not given) that differs
    from ``saved`` (a ``TrainConfig.to_dict()``), as ``"--flag value (the run was started with ...)"``.
    The :data:`MAY_CHANGE` fields may differ, and ``epochs`` may grow when ``longer`` (the
    ``--epochs`` flag; a config file's ``epochs`` must match: it may be the file the run was
    started with, its ``epochs`` overridden then)."""
    out = []
    for key, value in overrides.items():
        if value is None:
            continue
        path = OVERRIDE_PATHS.get(key, key)
        if path in MAY_CHANGE or key in MAY_CHANGE:
            continue
        old = _get(saved, path)
        if path == "epochs" and longer and old is not None and int(value) >= int(old):
            continue  # a longer run: documented
        if _same(value, old, path):
            continue
        name = where + path if where else usage.argument("--" + key.replace("_", "-"))
        shown = value if not isinstance(value, (list, tuple)) else " ".join(map(str, value))
        out.append(f"{name} {shown} (the run was started with {path} {old})")
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("data", "optim"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_fields(config: Any, model: str) -> tuple[dict[str, Any], str]:
    """The fields a config (TrainConfig, dict, YAML path) states explicitly, and how to name them.
    The config is checked first, one that names no model as one for ``model`` (the run's)."""
    from lungcore.train.config import TrainConfig

    if config is None:
        return {}, ""
    if isinstance(config, TrainConfig):
        return _flatten(config.to_dict()), "config field "
    if isinstance(config, dict):
        TrainConfig.from_dict({"model": model, **config})  # typos are errors here too
        return _flatten(config), "config field "
    path = Path(config)
    raw = usage.read_mapping(path, "config file", fmt="yaml", of=" of TrainConfig fields", empty_ok=True)
    TrainConfig.from_yaml(path, **({} if "model" in raw else {"model": model}))  # a malformed file is named first
    return _flatten(raw), f"--config {path}: "


def _saved_config(d: dict[str, Any]) -> Any:
    """The TrainConfig a run saved in ``last.pt``. Runs saved before ``stage_epochs`` was checked
    against the model in a dict may hold names that are no stage of it (``lungcore demo`` gave CMML
    and CSF-Net one mapping, so CMML's run saved CSF-Net's ``train``): such an entry never counted
    (``epochs_for`` looks up the model's own stages), so it is dropped and the run resumes as it
    would have."""
    from lungcore.train.config import TrainConfig, _model_class

    stage_epochs = d.get("stage_epochs")
    cls = _model_class(d.get("model", TrainConfig.model))
    if cls is not None and isinstance(stage_epochs, dict):
        d = {**d, "stage_epochs": {k: v for k, v in stage_epochs.items() if k in cls.stages}}
    return TrainConfig.from_dict(d)


def resume_config(out: str | os.PathLike, config: Any, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(TrainConfig to resume with, the last.pt payload)``; raises before anything is written.

    ``config`` and ``overrides`` are what :func:`lungcore.train.fit` was given; each must agree
    with the config saved in ``out/last.pt`` (see the module docstring for what may change).
    """
    from lungcore.train.checkpoints import TrainerState
    from lungcore.train.config import TrainConfig

    cli = usage.on_command_line()
    resume_arg = usage.argument("--resume")
    resuming = f"--resume {out}" if cli else f"resume=True, out={out}"
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise UsageError(f"{resume_arg}: {last} does not exist (nothing to resume; drop {resume_arg})")
    trainer, payload = TrainerState.read(last)
    extra = payload.get("extra", {})
    if trainer is None or "train_config" not in extra:
        raise UsageError(f"{resume_arg}: {last} holds no training state")
    saved = _saved_config(extra["train_config"])
    saved_dict = saved.to_dict()
    fields, where = _config_fields(config, overrides.get("model") or saved.model)
    longer = overrides.get("epochs")
    if longer is not None:  # --epochs beats the config's epochs and stage_epochs, as when the run started
        fields = {k: v for k, v in fields.items() if k not in ("epochs", "stage_epochs")}
    problems = contradictions(saved_dict, fields, where=where or "config field ", longer=False)
    problems += contradictions(saved_dict, {k: v for k, v in overrides.items() if k != "epochs"})
    remaining = _remaining_stages(saved, int(trainer.stage_index))
    if longer is not None:
        problems += _shorter(saved, remaining, longer)
    if problems:
        may = ", ".join(usage.argument(f) for f in ("--device", "--num-workers", "--no-progress"))
        raise UsageError(f"{resuming}: " + "; ".join(problems) + ". A resumed run keeps the config it was "
                         f"started with (only a longer {usage.argument('--epochs')}, {may} may "
                         f"differ): drop the {'flag' if cli else 'argument'}, "
                         f"or start a new run in another {usage.argument('--out')}")
    d = saved.to_dict()
    for key in ("progress", "device"):
        if overrides.get(key) is not None:
            d[key] = overrides[key]
        elif fields.get(key) is not None:
            d[key] = fields[key]
    if overrides.get("num_workers") is not None:
        d["data"]["num_workers"] = overrides["num_workers"]
    for name in PATH_FIELDS:  # a path that names the saved one (checked above), as given now
        if overrides.get(name) is not None:
            d["data"][name] = os.path.abspath(overrides[name])
        elif d["data"].get(name) is not None and not Path(d["data"][name]).is_absolute() \
                and not Path(d["data"][name]).exists():
            flag = "--" + name.replace("_", "-") if cli else f"{name}="
            raise UsageError(f"{resuming}: the run saved its {name.replace('_', ' ')} as {d['data'][name]}, "
                             f"relative to the directory it was started in, and it is not found from here: "
                             f"run from that directory, or pass {flag} with its path")
    if longer is not None:  # every stage still to train runs the new count (stages done keep theirs)
        d["epochs"] = int(longer)
        d["stage_epochs"] = {k: v for k, v in d["stage_epochs"].items() if k not in remaining}
    cfg = TrainConfig.from_dict(d)
    stages = trainer_stages(cfg)
    si = int(trainer.stage_index)
    stage = stages[min(si, len(stages) - 1)]
    stage_done = trainer.done or int(trainer.epoch) >= cfg.epochs_for(stage)
    if trainer.finished and si == len(stages) - 1 and stage_done:
        why = (f"stopped early at epoch {trainer.epoch} (patience {saved.patience})" if trainer.done
               else f"trained {trainer.epoch}/{saved.epochs_for(stage)} epochs of its last stage {stage!r}")
        raise RunFinished(f"{resume_arg}: the run in {out} is finished ({why}; best.pt and the test "
                          f"report are written); nothing to resume. Pass a larger {usage.argument('--epochs')} to "
                          "train its last stage longer")
    return cfg, payload


def _remaining_stages(cfg: Any, stage_index: int) -> list[str]:
    """The stages of ``cfg`` from ``stage_index`` (the one being trained; the last one for a finished
    run) to the end."""
    stages = trainer_stages(cfg)
    return stages[min(max(stage_index, 0), len(stages) - 1):]


def _shorter(saved: Any, remaining: list[str], epochs: Any) -> list[str]:
    """``--epochs`` on resume: the epoch count of every stage still to train; a count below one the
    run was started with (``epochs``, or a ``stage_epochs`` entry) is a contradiction."""
    counts = {stage: saved.epochs_for(stage) for stage in remaining}
    stage = max(remaining, key=lambda s: counts[s])
    try:
        shorter = int(epochs) < counts[stage]
    except (TypeError, ValueError):
        shorter = True
    if not shorter:
        return []
    field = f"stage_epochs.{stage}" if stage in saved.stage_epochs else "epochs"
    return [f"{usage.argument('--epochs')} {epochs} (the run was started with {field} {counts[stage]})"]


def trainer_stages(cfg: Any) -> list[str]:
    """The stages a config runs, in order (``cfg.stage``: one of the model's stages, or all)."""
    from lungcore.models.registry import model_class

    stages = list(model_class(cfg.model).stages)  # an unknown model name: a clear ValueError
    if cfg.stage in ("all", "both"):
        return stages
    if cfg.stage not in stages:
        from lungcore.train.config import ConfigError

        raise ConfigError("stage", f"{cfg.stage!r} is not a stage of {cfg.model!r}; stages: {stages} or 'all'")
    return [cfg.stage]


def clean_partial_writes(out: str | os.PathLike) -> list[str]:
    """Remove the temporary files an interrupted checkpoint or metrics write left in ``out``
    (``.last.pt.<random>.tmp``, ``.metrics.csv.tmp``); returns their names."""
    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for p in out.iterdir():
        if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


_steps_done = 0


def kill_point() -> None:
    """Fault-injection hook of the test suite: with ``LUNGCORE_KILL_AT_STEP=N`` in the environment,
    the process sends itself SIGKILL right after its N-th optimiser step (a deterministic
    ``kill -9``, no timing; ``LUNGCORE_KILL_SIGNAL=INT`` sends SIGINT instead: a Ctrl-C). Without
    the variable it does nothing."""
    global _steps_done
    at = os.environ.get("LUNGCORE_KILL_AT_STEP")
    if not at:
        return
    _steps_done += 1
    if _steps_done >= int(at):
        import signal

        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("LUNGCORE_KILL_SIGNAL", "KILL")))
