"""lungcore.train: the training loop, checkpoints + resume, torchrun/DDP, evaluation reports.

Example:
    >>> from lungcore.train import TrainConfig
    >>> TrainConfig(model="csfnet", epochs=2).epochs_for("train")
    2
"""
from lungcore.train.config import DataConfig, OptimConfig, TrainConfig
from lungcore.train.inference import evaluate, predict
from lungcore.train.loop import fit
from lungcore.train.trainer import FitResult, NonFiniteLossError

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "FitResult", "NonFiniteLossError", "evaluate", "fit",
           "predict"]
