"""The compile gate (``python -m benchmarks.aot``): every Triton kernel and the CUDA C++ resampler
compile for sm_90 with the real compilers, no GPU; the gate's rules fail what they claim to."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import aot

ROOT = Path(__file__).resolve().parents[2]

RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _fwd_kernel:
  REG:168 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:1040 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:32 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _row(**kw):
    row = dict(kernel="k", dtype="bf16", config="BLOCK=64 w4 s3", variant="", ok=True, registers=64, spills=0,
               shared=1024, tensor_core="wgmma", gemm=True, error="")
    row.update(kw)
    return row


def test_parse_res_usage_reads_registers_and_local_bytes():
    usage = aot.parse_res_usage(RES_USAGE)
    assert usage["_fwd_kernel"] == {"REG": 168, "STACK": 0, "SHARED": 0, "LOCAL": 8}
    assert usage["other"]["SHARED"] == 1024 and usage["other"]["STACK"] == 16


def test_tensor_core_instruction_from_ptx():
    assert aot.tensor_core("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert aot.tensor_core("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma"
    assert aot.tensor_core("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_gate_fails_on_each_rule_and_passes_a_clean_table():
    assert aot.gate([_row()], [], 90) == []
    assert any("spills" in p for p in aot.gate([_row(spills=2)], [], 90))
    assert any("shared memory" in p for p in aot.gate([_row(shared=227 * 1024 + 1)], [], 90))
    assert aot.gate([_row(shared=227 * 1024)], [], 90) == []
    assert any("tensor-core" in p for p in aot.gate([_row(tensor_core="none")], [], 90))
    # fp32 GEMMs and kernels without tt.dot may go without tensor cores
    assert aot.gate([_row(tensor_core="none", dtype="fp32"), _row(tensor_core="none", gemm=False)], [], 90) == []
    assert any("compile error" in p for p in aot.gate([_row(ok=False, error="boom")], [], 90))
    cpp_bad = [dict(compiler="nvcc", kernel="x", ok=False, error="err")]
    assert any("nvcc compile error" in p for p in aot.gate([], cpp_bad, 90))


def test_resident_blocks_follow_the_scarcest_resource():
    assert aot.resident_blocks(255, 0, 8, 90) == 1          # 255 regs x 256 threads: one block
    assert aot.resident_blocks(32, 0, 4, 90) == 16          # warps: 64 / 4
    assert aot.resident_blocks(32, 200 * 1024, 4, 90) == 1  # shared memory


def _jit_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in triton_kernels/ (what the launchers launch)."""
    names = set()
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if any("triton.jit" in d for d in decorators):
                    names.add(f"{path.stem}.{node.name}")
    return names


def _gpu_config_count(module: str, kernel: str) -> int:
    """Length of the ``gpu=[...]`` config list in the kernel's autotune decorator (this test process
    imports the kernels under the interpreter, which sees one config)."""
    tree = ast.parse((ROOT / "triton_kernels" / f"{module}.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == kernel)
    for call in ast.walk(node.decorator_list[0]):
        if isinstance(call, ast.keyword) and call.arg == "gpu":
            return len(call.value.elts)
    raise AssertionError(f"no gpu= config list on {kernel}")


def test_quick_gate_compiles_every_kernel_for_sm90(tmp_path):
    """The quick mode (what CI runs): every kernel, every autotune config, 0 failures and 0 spills,
    grids recorded from the real launchers, and the resampler through nvcc for sm_90."""
    pytest.importorskip("triton")
    if aot.tool_path("ptxas") is None or aot.tool_path("cuobjdump") is None:
        pytest.skip("this triton wheel ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--quick", "--jobs", "2", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "aot.json").read_text())
    rows = data["kernels"]
    assert data["meta"]["passed"] and data["meta"]["failures"] == 0 and data["problems"] == []
    assert {r["kernel"] for r in rows} == _jit_kernels()
    assert all(r["ok"] and r["spills"] == 0 and r["shared"] <= 227 * 1024 for r in rows)
    assert all(r["grids"] and all(b >= 1 for b in r["grids"].values()) for r in rows)
    # every autotune config of the GEMM kernels was compiled (after the kernels' own pruning)
    fwd = [r for r in rows if r["kernel"] == "patch_embed._forward_kernel"]
    assert len({r["config"] for r in fwd}) == _gpu_config_count("patch_embed", "_forward_kernel") > 1
    bf16_gemm = [r for r in rows if r["gemm"] and r["dtype"] == "bf16"]
    assert bf16_gemm and all(r["tensor_core"] in ("wgmma", "mma") for r in bf16_gemm)
    assert any(r["tensor_core"] == "wgmma" for r in bf16_gemm)
    if shutil.which("nvcc"):
        from lungcore.cuda_kernels.resample import kernel_names as _kernel_names

        nvcc = [r for r in data["cuda_cpp"] if r["compiler"] == "nvcc"]
        assert {r["kernel"] for r in nvcc} == set(_kernel_names()) and all(r["ok"] for r in nvcc)
    nvrtc = [r for r in data["cuda_cpp"] if r["compiler"] == "nvrtc" and not r.get("skipped")]
    if nvrtc:  # the nvidia-cuda-nvrtc wheel is installed: CuPy's own compiler path, same instantiations
        from lungcore.cuda_kernels.resample import kernel_names as _kernel_names

        assert {r["kernel"] for r in nvrtc} == set(_kernel_names()) and all(r["ok"] for r in nvrtc)
    assert "| patch_embed._forward_kernel | bf16 |" in (tmp_path / "aot.md").read_text()
