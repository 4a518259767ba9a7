"""The main job's path end to end at smoke-test size (``lungcore demo --quick``)."""
from __future__ import annotations

from lungcore.cli import main


def test_demo_quick(tmp_path, capsys):
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
