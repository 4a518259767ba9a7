"""The ``lungcore`` command: --help, --version, info, cindex (run as real subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd

import pytest

from lungcore import __version__
from lungcore.cli import main
from lungcore.metrics import concordance_index


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungcore", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lungcore {__version__}"
    out = run("--help")
    assert out.returncode == 0 and "info" in out.stdout and "cindex" in out.stdout
    for sub in ("info", "cindex"):
        assert run(sub, "--help").returncode == 0


def test_info_json_reports_backends():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["lungcore"] == __version__
    assert report["cpp_extension"] is True
    assert report["ops"]["concordance_index"]["cpu"] == "cpu"


def test_cindex_on_a_csv(tmp_path, rng):
    n = 200
    frame = pd.DataFrame({"risk": rng.normal(size=n), "t": rng.exponential(10, n).round(1),
                          "e": (rng.random(n) < 0.6).astype(int)})
    path = tmp_path / "preds.csv"
    frame.to_csv(path, index=False)
    out = run("cindex", "--csv", str(path), "--risk", "risk", "--time", "t", "--event", "e", "--tau", "8")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["cindex"] == concordance_index(frame.risk, frame.t, frame.e)
    assert 0 <= result["uno_cindex"] <= 1


def test_cindex_errors_name_the_column(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"risk": [1.0, 2.0], "t": [1.0, -2.0], "e": [1, 0]}).to_csv(path, index=False)
    out = run("cindex", "--csv", str(path), "--risk", "score", "--time", "t", "--event", "e")
    assert out.returncode != 0 and "--risk 'score' is not a column" in out.stderr
    out = run("cindex", "--csv", str(path), "--risk", "risk", "--time", "t", "--event", "e")
    assert out.returncode == 1 and "--time column 't', row 3: '-2.0' is negative" in out.stderr
    out = run("cindex", "--csv", str(tmp_path / "missing.csv"), "--risk", "r", "--time", "t", "--event", "e")
    assert out.returncode != 0 and "no such file" in out.stderr


def cindex(capsys, *args: str) -> tuple[int, str, str]:
    """``lungcore cindex ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(["cindex", *map(str, args)])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def predict_like_csv(tmp_path):
    """What ``lungcore predict`` writes for a cohort where some patients lack PFS: empty cells."""
    path = tmp_path / "risks.csv"
    pd.DataFrame({"id": ["A", "B", "C", "D", "E"], "pfs_risk": [0.5, 0.1, 0.9, 0.2, 0.3],
                  "pfs_time": [3.0, np.nan, 1.0, 6.0, np.nan], "pfs_event": [1.0, np.nan, 1.0, 0.0, np.nan],
                  "os_risk": [0.1, 0.2, 0.3, 0.4, 0.5], "os_time": [5.0, 8.0, 2.0, 4.0, 1.0],
                  "os_event": [1, 0, 1, 1, 0]}).to_csv(path, index=False)
    return path


def test_cindex_leaves_out_rows_with_empty_cells_and_says_so(tmp_path, capsys):
    path = predict_like_csv(tmp_path)
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "pfs_risk", "--time", "pfs_time", "--event", "pfs_event")
    assert rc == 0, err
    result = json.loads(out)
    assert result["cindex"] == concordance_index([0.5, 0.9, 0.2], [3.0, 1.0, 6.0], [1, 1, 0])
    assert (result["rows"], result["rows_left_out"]) == (3, 2)
    assert "left out 2 of 5 rows" in err and "'pfs_time' 2" in err and "--strict" in err
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "os_risk", "--time", "os_time", "--event", "os_event")
    assert rc == 0 and json.loads(out)["rows_left_out"] == 0 and err == ""
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "pfs_risk", "--time", "pfs_time", "--event", "pfs_event",
                          "--strict")
    assert rc == 1 and not out
    assert "--time column 'pfs_time', row 3 is empty (--strict" in err
    # blank lines (a gap, a trailing newline too many) are no rows: not left out, not refused
    text = path.read_text().splitlines()
    path.write_text("\n".join([*text[:2], "", *text[2:], "", ""]) + "\r\n")
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "os_risk", "--time", "os_time", "--event", "os_event",
                          "--strict")
    assert rc == 0 and err == "" and json.loads(out)["rows"] == 5, err


@pytest.mark.parametrize("column, cell, message", [
    ("t", "-2", "--time column 't', row 3: '-2' is negative"),
    ("e", "2", "--event column 'e', row 3: '2' must be 0 (censored) or 1 (event)"),
    ("r", "high", "--risk column 'r', row 3: 'high' is not a number"),
    ("t", "inf", "--time column 't', row 3: 'inf' is not finite"),
])
def test_cindex_present_but_invalid_cells_name_column_and_row(tmp_path, capsys, column, cell, message):
    frame = pd.DataFrame({"r": ["0.1", "0.2", "0.3"], "t": ["1", "2", "3"], "e": ["1", "0", "1"]})
    frame.loc[1, column] = cell
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "r", "--time", "t", "--event", "e")
    assert rc == 1 and not out
    assert message in err and len(err.strip().splitlines()) == 1


def test_cindex_user_mistakes_are_one_line_without_traceback(tmp_path, capsys):
    path = predict_like_csv(tmp_path)
    args = ("--time", "os_time", "--event", "os_event")
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "id", *args)  # a text column
    assert rc == 1 and "--risk column 'id', row 2: 'A' is not a number (5 bad rows)" in err
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "score", *args)
    assert rc == 2 and "--risk 'score' is not a column" in err and "(columns: id, pfs_risk, pfs_time" in err
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "os_risk", *args, "--tau", "-5")
    assert rc == 2 and "--tau must be a number > 0" in err and "no_pairs" not in err
    rc, out, err = cindex(capsys, "--csv", path, "--risk", "os_risk", *args, "--tau", "1.5")
    assert rc == 1 and "no event before --tau 1.5" in err
    (tmp_path / "empty.csv").write_text("")
    rc, out, err = cindex(capsys, "--csv", tmp_path / "empty.csv", "--risk", "r", "--time", "t", "--event", "e")
    assert rc == 1 and "--csv" in err and "is empty (no header row)" in err
    rc, out, err = cindex(capsys, "--csv", tmp_path, "--risk", "r", "--time", "t", "--event", "e")
    assert rc == 2 and "is a folder" in err
    censored = tmp_path / "censored.csv"
    censored.write_text("r,t,e\n0.1,1,0\n0.2,2,0\n")
    rc, out, err = cindex(capsys, "--csv", censored, "--risk", "r", "--time", "t", "--event", "e")
    assert rc == 1 and "no comparable pairs" in err and "no_pairs" not in err
    for text in (out, err):
        assert "Traceback" not in text


def test_bare_lungcore_is_a_usage_error_and_help_is_not(capsys):
    capsys.readouterr()
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert not out and err.splitlines()[-1].startswith("lungcore: error: a command is required: one of cindex,")
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "COMMAND" in capsys.readouterr().out
