"""Kill a real training process (SIGKILL) during epoch 3, --resume, compare with an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import tiny_config
from lungcore.models import read_checkpoint
from lungcore.train import fit

HERE = Path(__file__).parent


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training process ended (rc {proc.returncode}) before {text!r}")
        time.sleep(0.02)
    raise AssertionError(f"timeout waiting for {text!r}")


def test_sigkill_in_epoch_3_then_resume_matches_uninterrupted(tmp_path, nodule_cohort, cache_dir):
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=5,
                      model_overrides={"sleep": 0.15}, data={"batch_size": 4})
    reference = fit(cfg, out=tmp_path / "reference")

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "_run_fit.py"), str(cfg_file), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(out / "train.log", "stage train epoch 3/5 start", proc)
        time.sleep(0.2)  # inside epoch 3: a training step is running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    state = read_checkpoint(out / "last.pt")["extra"]["trainer"]
    assert state["epoch"] == 2  # epochs 1 and 2 finished; the kill lost only (part of) epoch 3
    assert "epoch 3/5 end" not in (out / "train.log").read_text()

    resumed = fit(cfg, out=out, resume=True)
    log = (out / "train.log").read_text()
    assert "resuming" in log and "at stage train epoch 3/5" in log
    assert log.count("stage train epoch 1/5 start") == 1  # not restarted from scratch
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    keys = ["train_loss", "val_loss", "val_roc_auc", "val_accuracy", "lr"]
    for a, b in zip(reference.history, resumed.history):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert reference.test_metrics == resumed.test_metrics or all(
        (a != a and b != b) or a == b for a, b in zip(reference.test_metrics.values(), resumed.test_metrics.values()))
    w_ref = read_checkpoint(reference.best_checkpoint)["state_dict"]
    w_res = read_checkpoint(resumed.best_checkpoint)["state_dict"]
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_resume_without_checkpoint_and_rerun_into_used_folder(tmp_path, nodule_cohort, cache_dir):
    import pytest

    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1)
    from lungcore.usage import UsageError

    with pytest.raises(UsageError, match="nothing to resume"):
        fit(cfg, out=tmp_path / "fresh", resume=True)
    fit(cfg, out=tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg, out=tmp_path / "run")
