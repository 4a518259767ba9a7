"""Floors (H200, H100): hand-counted bytes/FLOPs, each GPU's ceilings, the % of floor the harness reports,
the committed tables."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import floors
from benchmarks import run as bench_run
from benchmarks import harness
from benchmarks.harness import Case, Result, run_case

ROOT = Path(__file__).resolve().parents[2]


def test_attention_floor_counts_by_hand():
    f = floors.attention(2, 3, 40, 8, 16, backward=False, itemsize=2)
    q, kv = 2 * 3 * 40 * 16, 2 * 3 * 8 * 16
    assert f.bytes == 2 * (q + 2 * kv + q) + 2 * 8          # q, k, v read, out written, mask bytes
    assert f.flops == 4 * 2 * 3 * 40 * 8 * 16
    b = floors.attention(2, 3, 40, 8, 16, backward=True, itemsize=2)
    assert b.flops == 3 * f.flops and b.bytes == 2 * (4 * q + 4 * kv) + 2 * 8
    assert f.unit == "bf16-tc" and floors.attention(1, 1, 8, 8, 8, False, itemsize=4).unit == "tf32-tc"


def test_floor_is_the_larger_of_memory_and_compute_time():
    mem = floors.Floor("x", "s", bytes=int(4.3e12), flops=1, unit="bf16-tc")       # 1 s of bytes
    assert abs(mem.floor_us - 1e6) < 1e-3 and mem.bound == "memory"
    comp = floors.Floor("x", "s", bytes=1, flops=int(790e12 * 2), unit="bf16-tc")  # 2 s of matmul
    assert abs(comp.floor_us - 2e6) < 1e-3 and comp.bound == "compute"
    assert abs(mem.percent_of(2000.0) - 50.0) < 1e-9                               # 2 s measured


def test_patch_embed_and_cox_floors():
    f = floors.patch_embed(2, 1, (8, 32, 32), (4, 16, 16), 64, 1.0, backward=False, itemsize=2)
    n, k, m = 2 * 2 * 2, 1024, 2 * 8
    assert f.bytes == 2 * (m * k + 64 * k + 64 + n * 64 + m * 64)
    assert f.flops == 2 * m * k * 64
    assert floors.cox(1000).bytes == 1000 * (4 + 4 + 4 + 1)


def test_cpu_results_carry_no_floor_and_the_table_shows_it_only_with_one():
    case = Case(shape="n=1", providers={"eager": lambda: 1}, floor=floors.cox(10))
    (r,) = run_case("toy", case, "cpu", budget_s=0.01)
    assert r.floor_ms is None and r.pct_of_floor is None and r.floor_gpu is None   # a GPU's floor says nothing of a CPU
    assert "% of floor" not in bench_run.markdown_table([r])
    g = Result("cox", "n=10", "lungcore", 0.004, 1.0, 1.0, 5, 10, "eager", floor_ms=0.001, pct_of_floor=25.0,
               floor_gpu="h100")
    table = bench_run.markdown_table([g])
    assert "| H100 floor ms | % of floor |" in table and "| 25.0 |" in table


def test_each_gpu_has_its_own_ceilings():
    f = floors.Floor("x", "s", bytes=int(3.0e12), flops=int(798e12), unit="bf16-tc")
    h100 = f.on("h100")
    assert abs(h100.memory_us - 1e6) < 1e-3 and abs(h100.compute_us - 1e6) < 1e-3   # the H100's measured 3.0 TB/s, 798 TFLOP/s
    assert abs(f.memory_us - 3.0 / 4.3 * 1e6) < 1e-3 and f.gpu == "h200"              # the default: the H200's 4.3 TB/s
    assert f.on("h100").on("h200") == f
    memory_bound = floors.cox(65_536)
    assert memory_bound.on("h100").floor_us / memory_bound.floor_us == pytest.approx(4.3 / 3.0)
    with pytest.raises(ValueError, match="gpu: no ceilings for 'a100'"):
        f.on("a100")


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                      ("NVIDIA H100 PCIe", "h100"), ("NVIDIA A100-SXM4-80GB", None),
                                      ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_key_from_the_device_name(name, key):
    assert floors.gpu_key(name) == key


def test_harness_takes_the_floor_of_the_gpu_it_runs_on(monkeypatch):
    """On a CUDA device the harness looks the GPU up by name; on CPU, or an unknown GPU, no floor.
    (No GPU here: the device name is the only CUDA call floor_gpu makes, so it is stood in for.)"""
    assert harness.floor_gpu("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    assert harness.floor_gpu("cuda") == "h100" and harness.floor_gpu("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")
    assert harness.floor_gpu("cuda") is None


@pytest.mark.parametrize("gpu", sorted(floors.CEILINGS))
def test_committed_floors_tables_are_current(gpu):
    """benchmarks/results/floors-<gpu>.md is what `python -m benchmarks.floors` writes today."""
    committed = (ROOT / "benchmarks" / "results" / f"floors-{gpu}.md").read_text()
    assert committed == floors.markdown(floors.cuda_floors(), gpu), "rerun: python -m benchmarks.floors"


def test_floors_cli_writes_one_table_per_gpu(tmp_path, capsys):
    assert floors.main(["--gpu", "h100", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["floors-h100.md"]
    with pytest.raises(SystemExit):
        floors.main(["--out", str(tmp_path / "floors.md")])
    assert "--out: a folder, not a file" in capsys.readouterr().err
