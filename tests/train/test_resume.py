"""Kill a real training process (SIGKILL) during epoch 3, --resume, compare with an uninterrupted run.

The kill is deterministic: ``LUNGCORE_KILL_AT_STEP=N`` makes the trainer SIGKILL itself right
after its N-th optimiser step (no sleeps, no timing)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config
from lungcore.models import read_checkpoint
from lungcore.train import fit

HERE = Path(__file__).parent


def test_sigkill_in_epoch_3_then_resume_matches_uninterrupted(tmp_path, nodule_cohort, cache_dir):
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=5, data={"batch_size": 4})
    reference = fit(cfg, out=tmp_path / "reference")
    n_train = len(json.loads((tmp_path / "reference" / "splits.json").read_text())["train"])
    steps_per_epoch = n_train // 4 if n_train > 4 else 1  # drop_last when the split exceeds a batch

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
           "LUNGCORE_KILL_AT_STEP": str(2 * steps_per_epoch + 1)}  # the first step of epoch 3
    proc = subprocess.run([sys.executable, str(HERE / "_run_fit.py"), str(cfg_file), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
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
