"""The ``lungcore`` command: --help, --version, info, cindex (run as real subprocesses)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd

from lungcore import __version__
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
    assert out.returncode != 0 and "time[1] is negative" in out.stderr
    out = run("cindex", "--csv", str(tmp_path / "missing.csv"), "--risk", "r", "--time", "t", "--event", "e")
    assert out.returncode != 0 and "no such file" in out.stderr
