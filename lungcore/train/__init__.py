"""lungcore.train: the training loop, checkpoints + resume, torchrun/DDP, evaluation reports.

Example:
    >>> from lungcore.train import TrainConfig
    >>> TrainConfig(model="csfnet", epochs=2).epochs_for("train")
    2
"""
from typing import TYPE_CHECKING

from lungcore._lazy import lazy_exports

if TYPE_CHECKING:
    from lungcore.train.config import DataConfig, OptimConfig, TrainConfig
    from lungcore.train.inference import evaluate, predict
    from lungcore.train.loop import fit
    from lungcore.train.trainer import FitResult, NonFiniteLossError

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "FitResult", "NonFiniteLossError", "evaluate", "fit",
           "predict"]
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["DataConfig", "OptimConfig", "TrainConfig"], "lungcore.train.config"),
    **dict.fromkeys(["evaluate", "predict"], "lungcore.train.inference"),
    "fit": "lungcore.train.loop",
    **dict.fromkeys(["FitResult", "NonFiniteLossError"], "lungcore.train.trainer"),
})
