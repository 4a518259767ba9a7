"""The main job's path end to end at smoke-test size (``lungcore demo --quick``), and the
experiment that reruns the demo's CMML per seed and variant on its folder."""
from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from lungcore.cli import main

VARIANTS_SCRIPT = Path(__file__).parents[2] / "experiments" / "cmml_demo_variants.py"


def test_demo_quick(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--threads", "1"]) == 0
    table = (tmp_path / "demo.md").read_text()
    assert "| cmml | os_harrell_cindex |" in table and "| csfnet | roc_auc |" in table
    assert (tmp_path / "cmml" / "report" / "km_os.png").is_file()
    assert (tmp_path / "csfnet" / "report" / "roc.png").is_file()
    assert "oracle" in capsys.readouterr().out
    # a rerun finds the runs finished and reads their test reports: the same table
    assert main(["demo", "--out", str(tmp_path), "--quick", "--threads", "1"]) == 0
    assert "cmml is finished" in capsys.readouterr().out
    assert (tmp_path / "demo.md").read_text().split("Total")[0] == table.split("Total")[0]
    # experiments/cmml_demo_variants.py on this demo folder (2 seeds x 2 variants: the default and a run-field one)
    monkeypatch.setattr(sys, "argv", [str(VARIANTS_SCRIPT), "--demo", str(tmp_path), "--seeds", "2",
                                      "--variants", "0,7", "--workdir", str(tmp_path / "variants"),
                                      "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(VARIANTS_SCRIPT), run_name="__main__")
    assert done.value.code == 0
    md = (tmp_path / "results" / "cmml_demo_variants.md").read_text()
    assert "| default (T2G graph, pretrained fusion, column lr 1e-2) |" in md
    assert "| 8 pretraining epochs |" in md and "| seed 1 |" in md
    longer = yaml.safe_load((tmp_path / "variants" / "variant7" / "seed1" / "config.yaml").read_text())
    assert longer["stage_epochs"]["pretrain"] == 8 and longer["stage_epochs"]["finetune"] == 2
    with open(tmp_path / "results" / "cmml_demo_variants.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 and all(int(r["edges_changed"]) >= 0 and int(r["edge_slots"]) > 0 for r in rows)
