"""Compile gate: every kernel compiled ahead of time for Hopper (sm_90: H100, H200), no GPU needed.

    python -m benchmarks.aot [--quick] [--arch 90] [--jobs N] [--out DIR]

What it does
  1. Calls the real lungcore ops (forward and backward) with CPU tensors at the benchmark shapes
     (``benchmarks/bench_*.py``'s ``shapes``/``sizes``) for every dtype each op accepts, with
     ``JITFunction.run`` and ``Autotuner.run`` intercepted: every launch is recorded (kernel,
     arguments, grid, the autotune configs left after the kernel's own pruning) and nothing runs.
     Launchers size their grids as for a GPU with ``--sms`` multiprocessors
     (``triton_kernels._launch.sizing_for``), so the recorded grids are the GPU's.
  2. Binds each launch with Triton's own binder for the CUDA target (16-byte alignment and
     divisibility-by-16 specialisation as a real launch makes it) and compiles every distinct
     (kernel, signature, config) with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``,
     ``TRITON_INTERPRET`` unset, in a fresh cache folder under a temporary path.
  3. Reads registers and spills from the cubin (``cuobjdump -res-usage`` from the triton wheel;
     spills = LOCAL / 4 bytes), shared memory from the compiled metadata, and the tensor-core
     instruction from the PTX (``wgmma``, ``mma`` or none).
  4. Compiles ``csrc/cuda/resample.cu`` with nvcc (``-arch=sm_<arch> -cubin``) for every
     instantiation CuPy asks NVRTC for (``lungcore.cuda_kernels.resample.kernel_names``), and with NVRTC
     itself (CuPy's name expressions, ``--std=c++14``) when the ``nvidia-cuda-nvrtc`` wheel is
     installed.
  5. Writes ``aot.json`` and ``aot.md`` (one row per kernel x dtype x config: registers, spills,
     shared memory, tensor-core instruction, blocks launched at each benchmark shape against the
     GPU's multiprocessors) to ``--out`` (default ``benchmarks/results/aot-sm<arch>[-quick]/``).

Exit status 1 on any compile error, any spill, shared memory over the per-block limit (227 KiB
on sm_90), or a GEMM-shaped kernel (one with ``tt.dot``) compiled for bf16 without tensor-core
instructions. ``--quick`` compiles one benchmark shape per op, bf16 for the GEMM ops and fp32 for Cox (a few minutes on
2 cores; what ``make test`` runs).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}   # per-block opt-in maximum
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024, 89: 100 * 1024}
REGS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = 64

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ------------------------------------------------------------------------------------ capture
@dataclass
class Launch:
    """One intercepted kernel launch: what the launcher asked for, nothing run."""

    kernel: str                 # module-qualified name, e.g. triton_kernels.attention._fwd_kernel
    jit: object                 # the JITFunction
    args: tuple
    kwargs: dict
    grid: object
    configs: list               # triton.Config objects after pruning, [None] for a plain launch
    workload: str = ""          # op + shape label
    dtype: str = ""


class Recorder:
    """Context manager intercepting ``JITFunction.run`` and ``Autotuner.run``."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.workload = ""
        self.dtype = ""

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self._saved = (JITFunction.run, Autotuner.run)
        rec = self

        def jit_run(jit, *args, grid, warmup=False, **kwargs):
            rec.launches.append(Launch(_qualname(jit), jit, args, kwargs, grid, [None], rec.workload, rec.dtype))
            return None

        def autotune_run(tuner, *args, **kwargs):
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = list(tuner.prune_configs(kwargs)) if len(tuner.configs) > 1 else list(tuner.configs)
            tuner.nargs = None
            jit = tuner.fn
            while hasattr(jit, "fn") and not isinstance(jit, JITFunction):
                jit = jit.fn
            rec.launches.append(Launch(_qualname(jit), jit, args, kwargs, grid, configs, rec.workload, rec.dtype))
            return None

        JITFunction.run = jit_run
        Autotuner.run = autotune_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        JITFunction.run, Autotuner.run = self._saved
        return False

    @contextlib.contextmanager
    def labelled(self, workload: str, dtype: torch.dtype):
        self.workload, self.dtype = workload, _DTYPE_NAMES.get(dtype, str(dtype))
        try:
            yield
        finally:
            self.workload, self.dtype = "", ""


def _qualname(jit) -> str:
    fn = getattr(jit, "fn", jit)
    return f"{fn.__module__}.{fn.__name__}".replace("lungcore.triton_kernels.", "")


# ---------------------------------------------------------------------------------- workloads
def _grad_of(out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)


def attention_workloads(rec: Recorder, dtypes, quick: bool) -> None:
    from benchmarks import bench_attention
    from lungcore.ops import masked_cross_attention

    shapes = bench_attention.shapes("cuda", quick)
    if quick:
        shapes = shapes[:1]
    for label, (b, h, lq, lk, d) in shapes:
        variants = [("", {})]
        if not quick and label.startswith("net A"):
            variants.append((" +query mask +dropout", {"query_mask": True, "dropout_p": 0.1}))
        for dtype in dtypes:
            for suffix, extra in variants:
                q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=True)
                k = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=True)
                v = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=True)
                km = torch.rand(b, lk) < 0.5
                km[:, 0] = True
                kwargs = {"key_mask": km}
                if extra.get("query_mask"):
                    kwargs["query_mask"] = torch.rand(b, lq) < 0.9
                if extra.get("dropout_p"):
                    kwargs["dropout_p"] = extra["dropout_p"]
                with rec.labelled(f"attention {label} B={b} H={h} Lq={lq} Lk={lk} D={d}{suffix}", dtype):
                    out = masked_cross_attention(q, k, v, **kwargs)
                    _grad_of(out, [q, k, v])


def patch_embed_workloads(rec: Recorder, dtypes, quick: bool) -> None:
    from benchmarks import bench_patch_embed
    from lungcore.ops import patch_embed3d

    shapes = bench_patch_embed.shapes("cuda", quick)
    if quick:
        shapes = shapes[:1]
    for label, B, C, spatial, patch, E in shapes:
        n_tokens = 1
        for s, p in zip(spatial, patch):
            n_tokens *= s // p
        ratios = (0.25,) if quick else (1.0, 0.25)
        for dtype in dtypes:
            for ratio in ratios:
                T = max(1, round(ratio * n_tokens))
                x = torch.randn(B, C, *spatial, dtype=dtype, requires_grad=True)
                w = torch.randn(E, C, *patch, dtype=dtype, requires_grad=True)
                bias = torch.zeros(E, dtype=dtype, requires_grad=True)
                pos = torch.zeros(n_tokens, E, dtype=dtype, requires_grad=True)
                visible = None if ratio == 1.0 else torch.rand(B, n_tokens).argsort(dim=1)[:, :T]
                with rec.labelled(f"patch_embed {label} B={B} {C}x{'x'.join(map(str, spatial))} "
                                  f"p={'x'.join(map(str, patch))} E={E} ratio={ratio}", dtype):
                    out = patch_embed3d(x, w, bias, pos, visible)
                    _grad_of(out, [x, w, bias, pos])


def cox_workloads(rec: Recorder, dtypes, quick: bool) -> None:
    from benchmarks import bench_cox
    from lungcore.ops import cox_ph_loss

    sizes = bench_cox.sizes("cuda", quick)
    if quick:
        sizes = sizes[:1]
    variants = [("efron sum", {"ties": "efron", "reduction": "sum"})]
    if not quick:
        variants += [("breslow mean +weights +strata", {"ties": "breslow", "reduction": "mean", "weighted": True}),
                     ("efron none", {"ties": "efron", "reduction": "none"})]
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        time_ = torch.randint(0, 2000, (n,), generator=g).float()
        event = torch.rand(n, generator=g) < 0.7
        for dtype in dtypes:
            for name, v in variants:
                if name != "efron sum" and n != sizes[0]:
                    continue
                risk = torch.randn(n, generator=g).to(dtype).requires_grad_()
                extra = {}
                if v.get("weighted"):
                    extra = {"weights": torch.rand(n, generator=g), "strata": torch.randint(0, 4, (n,), generator=g)}
                with rec.labelled(f"cox n={n:,} {name}", dtype):
                    loss = cox_ph_loss(risk, time_, event, ties=v["ties"], reduction=v["reduction"], **extra)
                    _grad_of(loss, [risk])


OPS = {
    # op: (workload function, dtypes it accepts, quick dtypes)
    "attention": (attention_workloads, (torch.float32, torch.float16, torch.bfloat16), (torch.bfloat16,)),
    "patch_embed": (patch_embed_workloads, (torch.float32, torch.float16, torch.bfloat16),
                    (torch.bfloat16,)),
    "cox": (cox_workloads, (torch.float16, torch.bfloat16, torch.float32, torch.float64), (torch.float32,)),
}


def record_launches(quick: bool, sms: int, ops: list[str], dtypes: list[str] | None = None) -> list[Launch]:
    """Every launch the ops make at the benchmark shapes, recorded with the grids of an ``sms``-SM GPU."""
    from lungcore import backend
    from lungcore.triton_kernels._launch import sizing_for

    rec = Recorder()
    # the Triton path on CPU tensors: nothing runs (the recorder swallows every launch), so the
    # availability rule "CUDA tensors or the interpreter" is lifted for this process only
    saved = backend.interpreting
    backend.interpreting = lambda: True
    try:
        with rec, sizing_for(sms), backend.use_backend("triton"):
            for op in ops:
                fn, accepted, quick_dtypes = OPS[op]
                chosen = quick_dtypes if quick else accepted
                if dtypes is not None:
                    chosen = tuple(d for d in accepted if _DTYPE_NAMES[d] in dtypes)
                if chosen:
                    fn(rec, chosen, quick)
    finally:
        backend.interpreting = saved
    return rec.launches


# ------------------------------------------------------------------------------------ binding
@dataclass
class Job:
    """One distinct compile: a kernel, its specialised signature and one config."""

    kernel: str
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    variant: str
    dtype: str
    gemm_expected: bool = False
    grids: dict = field(default_factory=dict)    # workload -> blocks launched


def _options_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    try:
        from triton import knobs

        out.setdefault("debug", knobs.runtime.debug)
        out.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            out.setdefault("fpsan_homomorphic_casts", knobs.compilation.fpsan_homomorphic_casts)
    except (ImportError, AttributeError):
        pass
    return out


def _blocks(grid, bound_args: dict) -> int:
    if callable(grid):
        grid = grid(bound_args)
    n = 1
    for g in tuple(grid)[:3]:
        n *= int(g)
    return n


def _block_names(jit) -> set[str]:
    return {p.name for p in jit.params if p.is_constexpr and p.name.startswith(("BLOCK", "GROUP", "SPLIT", "CB"))}


def bind(launches: list[Launch], arch: int, every_signature: bool = False) -> list[Job]:
    """Distinct compile jobs, specialised exactly as Triton's JIT would for a CUDA launch.

    One job per (kernel, argument types, constexprs, options): the first shape's integer
    specialisation (divisibility by 16, alignment) is compiled and the other shapes only add
    their grids, unless ``every_signature`` compiles each shape's own specialisation too.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binders: dict[int, object] = {}
    jobs: dict[str, Job] = {}
    for launch in launches:
        jit = launch.jit
        binder = binders.setdefault(id(jit), create_function_from_signature(jit.signature, jit.params, backend))
        for cfg in launch.configs:
            kwargs = dict(launch.kwargs)
            if cfg is not None:
                kwargs.update(cfg.all_kwargs())
            kwargs = _options_kwargs(kwargs)
            bound_args, specialization, opts = binder(*launch.args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, opts)
            opt = dict(options.__dict__)
            blocks = _block_names(jit)
            named = {name: bound_args[name] for name in bound_args if name in blocks}
            config = " ".join(f"{k}={v}" for k, v in sorted(named.items()))
            config += f" w{opt['num_warps']} s{opt['num_stages']}"
            flags = {p.name: bound_args[p.name] for p in jit.params
                     if p.is_constexpr and p.name not in blocks}
            variant = " ".join(f"{k}={_short(v)}" for k, v in flags.items())
            key = json.dumps([launch.kernel, {k: str(v) for k, v in signature.items()},
                              sorted((str(k), str(v)) for k, v in constexprs.items()),
                              sorted((str(k), str(v)) for k, v in attrs.items()) if every_signature else [],
                              sorted((k, str(v)) for k, v in opt.items())])
            job = jobs.get(key)
            if job is None:
                fn = jit.fn
                job = Job(kernel=launch.kernel, module=fn.__module__, name=fn.__name__, signature=signature,
                          constexprs=constexprs, attrs=attrs, options=opt, config=config.strip(),
                          variant=variant, dtype=launch.dtype)
                jobs[key] = job
            job.grids[launch.workload] = _blocks(launch.grid, bound_args)
    return list(jobs.values())


def _short(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v).replace("triton.language.", "").replace("tl.", "")


# ------------------------------------------------------------------------------------ compile
def tool_path(name: str) -> str | None:
    """A CUDA tool shipped in the triton wheel (ptxas, cuobjdump), else one on PATH."""
    import triton

    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(here) if here.is_file() else shutil.which(name)


def res_usage(cubin: bytes, workdir: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` per function: REG, SHARED, LOCAL, STACK (bytes except REG)."""
    tool = tool_path("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in the triton wheel)")
    path = Path(tempfile.mkstemp(suffix=".cubin", dir=workdir)[1])
    path.write_bytes(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink()
    return parse_res_usage(text)


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": .., "SHARED": .., "LOCAL": .., "STACK": ..}} from cuobjdump's report."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}
            current = None
    return out


def tensor_core(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\b|\bmma\.", ptx):
        return "mma"
    return "none"


def compile_job(job: Job, arch: int, workdir: str) -> dict:
    """Compile one job; registers, spills, shared memory, tensor-core instruction, or the error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job.module), job.name)
        jit = kernel
        while not hasattr(jit, "arg_names") or hasattr(jit, "configs"):
            jit = jit.fn
        src = ASTSource(fn=jit, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        cc = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
        usage = res_usage(cc.asm["cubin"], workdir)
        entry = usage.get(cc.metadata.name) or next(iter(usage.values()))
        ttir = cc.asm.get("ttir", "")
        return dict(ok=True, registers=entry["REG"], spills=entry.get("LOCAL", 0) // 4,
                    stack=entry.get("STACK", 0), shared=int(cc.metadata.shared),
                    tensor_core=tensor_core(cc.asm["ptx"]), gemm="tt.dot" in ttir,
                    seconds=round(time.perf_counter() - t0, 2), error="")
    except Exception as exc:  # noqa: BLE001 (the gate reports every failure, then fails)
        return dict(ok=False, registers=None, spills=None, stack=None, shared=None, tensor_core=None,
                    gemm=None, seconds=round(time.perf_counter() - t0, 2), error=f"{type(exc).__name__}: {exc}"[:2000])


_JOBS: list[Job] = []


def _worker(args):
    index, arch, workdir = args
    return index, compile_job(_JOBS[index], arch, workdir)


def compile_all(jobs: list[Job], arch: int, workers: int, workdir: str, progress: bool = True) -> list[dict]:
    """Compile every job (forked workers share the imported kernels); results in job order."""
    global _JOBS
    _JOBS = jobs
    results: list[dict] = [{} for _ in jobs]
    todo = [(i, arch, workdir) for i in range(len(jobs))]
    if workers <= 1:
        for item in todo:
            i, r = _worker(item)
            results[i] = r
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            for done, (i, r) in enumerate(pool.imap_unordered(_worker, todo), 1):
                results[i] = r
                if progress and done % 20 == 0:
                    print(f"  compiled {done}/{len(jobs)}", flush=True)
    return results


# ------------------------------------------------------------------------------- occupancy
def resident_blocks(registers: int, shared: int, num_warps: int, arch: int) -> int:
    """Blocks of one kernel that fit on one multiprocessor at once (registers, shared memory,
    warps, block slots); registers allocated per warp in units of 256."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else MAX_BLOCKS_PER_SM
    by_smem = SMEM_PER_SM.get(arch, 228 * 1024) // (shared + 1024)
    by_warps = MAX_WARPS_PER_SM // num_warps
    return max(0, min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM))


# ------------------------------------------------------------------------------- CUDA C++
def _resample_names() -> list[str]:
    from lungcore.cuda_kernels.resample import kernel_names

    return kernel_names()


def cuda_cpp(arch: int, workdir: str) -> list[dict]:
    """resample.cu through nvcc (-cubin) and NVRTC (when installed): one row per instantiation."""
    from lungcore.cuda_kernels.resample import cuda_source_dir

    source = cuda_source_dir() / "resample.cu"
    names = _resample_names()
    rows: list[dict] = []
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        rows.append(dict(compiler="nvcc", kernel="resample.cu", ok=False, skipped=True, error="nvcc not on PATH"))
    else:
        driver = Path(workdir) / "resample_all.cu"
        refs = ",\n    ".join(f"(void*)&{name}" for name in names)
        driver.write_text(f'#include "{source}"\nvoid* lungcore_all_kernels[] = {{\n    {refs}\n}};\n')
        cubin = Path(workdir) / "resample_all.cubin"
        t0 = time.perf_counter()
        proc = subprocess.run([nvcc, "-std=c++14", f"-arch=sm_{arch}", "-cubin", "-Werror", "all-warnings",
                               str(driver), "-o", str(cubin)], capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            rows.append(dict(compiler="nvcc", kernel="resample.cu", ok=False, error=proc.stderr[-2000:]))
        else:
            rows += _cpp_rows("nvcc", res_usage(cubin.read_bytes(), workdir), names, seconds)
    nvrtc = _load_nvrtc()
    if nvrtc is None:
        rows.append(dict(compiler="nvrtc", kernel="resample.cu", ok=True, skipped=True,
                         error="libnvrtc not found (pip install nvidia-cuda-nvrtc to compile through NVRTC too)"))
    else:
        t0 = time.perf_counter()
        try:
            cubin_bytes = _nvrtc_compile(nvrtc, source.read_text(), names, arch)
            rows += _cpp_rows("nvrtc", res_usage(cubin_bytes, workdir), names, round(time.perf_counter() - t0, 2))
        except RuntimeError as exc:
            rows.append(dict(compiler="nvrtc", kernel="resample.cu", ok=False, error=str(exc)[-2000:]))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _canon(expr: str) -> str:
    return re.sub(r"\s+", "", expr).replace("signedchar", "signed char")


def _cpp_rows(compiler: str, usage: dict, names: list[str], seconds: float) -> list[dict]:
    demangled = _demangle(list(usage))
    wanted = {re.sub(r"\s+", "", n): n for n in names}
    rows = []
    for mangled, res in sorted(usage.items()):
        pretty = re.sub(r"\(.*$", "", demangled.get(mangled, mangled))
        pretty = re.sub(r"^void ", "", pretty)
        key = re.sub(r"\s+", "", pretty)
        rows.append(dict(compiler=compiler, kernel=wanted.get(key, pretty), ok=True, registers=res["REG"],
                         spills=res.get("LOCAL", 0) // 4, stack=res.get("STACK", 0), shared=res.get("SHARED", 0),
                         seconds=seconds, error=""))
    missing = set(wanted) - {re.sub(r"\s+", "", r["kernel"]) for r in rows}
    for key in sorted(missing):
        rows.append(dict(compiler=compiler, kernel=wanted[key], ok=False, error="instantiation missing from the cubin"))
    return rows


def _load_nvrtc():
    candidates = []
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True)
    except ImportError:
        pass
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    for path in sorted(candidates, key=len):
        if "builtins" in path or "alt" in os.path.basename(path):
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _nvrtc_compile(lib, source: str, names: list[str], arch: int) -> bytes:
    """CuPy's RawModule recipe: name expressions added, compiled with --std=c++14, cubin back."""
    def check(status, what):
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"resample.cu", 0, None, None), "create")
    try:
        for name in names:
            check(lib.nvrtcAddNameExpression(prog, name.encode()), f"name {name}")
        opts = [b"--std=c++14", f"--gpu-architecture=sm_{arch}".encode()]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC compile failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, buf), "cubin")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------------- report
def gate(rows: list[dict], cpp: list[dict], arch: int) -> list[str]:
    """Every reason the gate fails (empty = pass)."""
    limit = SMEM_LIMIT.get(arch, 227 * 1024)
    problems = []
    for r in rows:
        what = f"{r['kernel']} [{r['dtype']}; {r['config']}; {r['variant']}]"
        if not r["ok"]:
            problems.append(f"compile error: {what}: {r['error'].splitlines()[0] if r['error'] else ''}")
            continue
        if r["spills"]:
            problems.append(f"spills {r['spills']} registers: {what}")
        if r["shared"] > limit:
            problems.append(f"shared memory {r['shared']} B > {limit} B: {what}")
        if r["gemm"] and r["dtype"] == "bf16" and r["tensor_core"] == "none":
            problems.append(f"GEMM-shaped kernel without tensor-core instructions in bf16: {what}")
    for r in cpp:
        if r.get("skipped"):
            continue
        if not r["ok"]:
            problems.append(f"{r['compiler']} compile error: {r['kernel']}: {r['error'][:300]}")
        elif r["spills"]:
            problems.append(f"{r['compiler']} spills {r['spills']} registers: {r['kernel']}")
    return problems


def markdown(meta: dict, rows: list[dict], cpp: list[dict], problems: list[str]) -> str:
    sms = meta["sms"]
    lines = [f"# Ahead-of-time compile table: sm_{meta['arch']} ({sms} SMs)", "",
             "Commands (per op): " + "; ".join(f"{op}: `{c}`" for op, c in sorted(meta.get("runs", {}).items()))
             + f". Triton {meta['triton']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.", "",
             f"{meta['compiled']} kernel x dtype x config compiles in {meta['seconds']:.0f} s "
             f"({meta['jobs']} workers): {meta['failures']} failures, {meta['spilling']} with spills, "
             f"max shared memory {meta['max_shared']} B, max registers {meta['max_registers']}. "
             f"Gate: {'PASS' if not problems else 'FAIL'}.", "",
             "Registers and spills (LOCAL / 4) from `cuobjdump -res-usage` of the cubin; shared memory from "
             "the compiled metadata (bytes); tensor core from the PTX. Blocks: grid size at each benchmark shape "
             f"(the launchers' own grid functions, sized for {sms} SMs), then waves = blocks / ({sms} x resident "
             "blocks per SM by registers, shared memory and warps).", ""]
    if problems:
        lines += ["## Gate failures", ""] + [f"- {p}" for p in problems] + [""]
    lines += ["## Triton kernels", "",
              "| kernel | dtype | config | variant | regs | spills | smem B | TC | resident/SM | blocks (waves) at each shape |",
              "|---|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        shapes = "; ".join(f"{w}: {b} ({b / (sms * r['resident']):.2f})" if r.get("resident") else f"{w}: {b}"
                           for w, b in r["grids"].items())
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['variant']} | ERROR | | | | | {shapes} |")
            continue
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['variant']} | {r['registers']} | "
                     f"{r['spills']} | {r['shared']} | {r['tensor_core']} | {r['resident']} | {shapes} |")
    lines += ["", "## CUDA C++ (csrc/cuda/resample.cu, the instantiations CuPy asks NVRTC for)", "",
              "| compiler | kernel | regs | spills | stack B | smem B |", "|---|---|---:|---:|---:|---:|"]
    for r in cpp:
        if r.get("skipped"):
            lines.append(f"| {r['compiler']} | (skipped: {r['error']}) | | | | |")
        elif not r["ok"]:
            lines.append(f"| {r['compiler']} | {r['kernel']} | ERROR | | | |")
        else:
            lines.append(f"| {r['compiler']} | `{r['kernel']}` | {r['registers']} | {r['spills']} | {r['stack']} | "
                         f"{r['shared']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one benchmark shape per op, bf16 (fp32 for Cox) only: what make test runs")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the grids are sized for (H100 and H200: 132)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="parallel compiles")
    parser.add_argument("--only", nargs="+", choices=sorted(OPS), default=None, help="only these ops' kernels")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPE_NAMES.values()), default=None,
                        help="only these input dtypes (those an op does not accept are skipped)")
    parser.add_argument("--every-signature", action="store_true",
                        help="compile each benchmark shape's own integer specialisation (default: one per "
                             "kernel x dtype x config x constexpr variant, the other shapes add their grids)")
    parser.add_argument("--no-cpp", action="store_true", help="skip the CUDA C++ sources")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of the ops not compiled now (and the C++ rows with --no-cpp) from "
                             "the aot.json already in --out: one table built by several partial runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/aot-sm<arch>[-quick])")
    args = parser.parse_args(argv)
    # the kernels read TRITON_INTERPRET when they are decorated (and the launchers when they run):
    # the real compiler needs it unset before any kernel module is imported
    if os.environ.pop("TRITON_INTERPRET", "0") == "1":
        loaded = [m for m in sys.modules if m.startswith("lungcore.triton_kernels.") and m != "lungcore.triton_kernels._launch"]
        if loaded:
            parser.error(f"kernel modules {loaded} were imported under TRITON_INTERPRET=1: run in a fresh process")

    import datetime as _dt

    import triton

    from benchmarks.run import git_commit

    t0 = time.perf_counter()
    out = args.out or HERE / "results" / f"aot-sm{args.arch}{'-quick' if args.quick else ''}"
    with tempfile.TemporaryDirectory(prefix="lungcore-aot-") as tmp:
        # a fresh cache: every kernel is really compiled, and nothing outside is read or written
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        try:
            from triton import knobs

            knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
        except (ImportError, AttributeError):
            pass
        ops = args.only or sorted(OPS)
        launches = record_launches(args.quick, args.sms, ops, args.dtypes)
        jobs = bind(launches, args.arch, args.every_signature)
        print(f"{len(launches)} launches recorded -> {len(jobs)} distinct compiles; compiling with {args.jobs} workers",
              flush=True)
        results = compile_all(jobs, args.arch, args.jobs, tmp)
        cpp = [] if args.no_cpp else cuda_cpp(args.arch, tmp)
    rows = []
    for job, res in zip(jobs, results):
        row = dict(kernel=job.kernel, dtype=job.dtype, config=job.config, variant=job.variant,
                   num_warps=job.options["num_warps"], num_stages=job.options["num_stages"], grids=job.grids, **res)
        row["resident"] = (resident_blocks(res["registers"], res["shared"], job.options["num_warps"], args.arch)
                           if res["ok"] else None)
        rows.append(row)
    seconds = time.perf_counter() - t0
    previous = out / "aot.json"
    command = "python -m benchmarks.aot " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = {op: command for op in ops}
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        ran = set(ops)
        runs = {**{op: c for op, c in old["meta"].get("runs", {}).items() if op not in ran}, **runs}
        rows += [r for r in old["kernels"] if r["kernel"].split(".")[0] not in ran]
        if args.no_cpp:
            cpp = old.get("cuda_cpp", [])
        seconds += old["meta"].get("seconds", 0.0)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["variant"], r["config"]))
    problems = gate(rows, cpp, args.arch)
    ok_rows = [r for r in rows if r["ok"]]
    meta = dict(arch=args.arch, sms=args.sms, quick=args.quick, triton=triton.__version__, torch=torch.__version__,
                commit=git_commit(), date=_dt.date.today().isoformat(), jobs=args.jobs,
                compiled=len(rows), failures=sum(not r["ok"] for r in rows),
                spilling=sum(bool(r["spills"]) for r in ok_rows),
                max_shared=max((r["shared"] for r in ok_rows), default=0),
                max_registers=max((r["registers"] for r in ok_rows), default=0),
                seconds=seconds, passed=not problems, runs=runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot.json").write_text(json.dumps(dict(meta=meta, kernels=rows, cuda_cpp=cpp, problems=problems),
                                             indent=1, default=str))
    (out / "aot.md").write_text(markdown(meta, rows, cpp, problems))
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    print(f"\n{'kernel':<42} {'compiles':>8} {'fail':>5} {'spill':>5} {'max regs':>8} {'max smem':>9}  TC in bf16")
    for name, rs in by_kernel.items():
        good = [r for r in rs if r["ok"]]
        tcs = sorted({r["tensor_core"] for r in good if r["dtype"] == "bf16"})
        print(f"{name:<42} {len(rs):>8} {len(rs) - len(good):>5} {sum(bool(r['spills']) for r in good):>5} "
              f"{max((r['registers'] for r in good), default=0):>8} {max((r['shared'] for r in good), default=0):>9}  "
              f"{'/'.join(tcs) or '-'}")
    for r in cpp:
        if r.get("skipped"):
            print(f"{r['compiler']}: skipped ({r['error']})")
    n_cpp = sum(1 for r in cpp if r.get("ok") and not r.get("skipped"))
    print(f"\n{meta['compiled']} Triton compiles, {meta['failures']} failures, {meta['spilling']} spilling; "
          f"{n_cpp} CUDA C++ kernels compiled; {meta['seconds']:.0f} s; wrote {out}/aot.json and aot.md")
    if problems:
        print("GATE FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("gate: pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
