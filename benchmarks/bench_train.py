"""End-to-end training step throughput of both networks: fused ops vs reference ops.

One provider call = one optimiser step (forward, loss, backward, AdamW step: the optimiser
``lungcore train`` builds, ``lungcore.train.schedule.optimizer``) on a synthetic batch of the shapes
``lungcore.data`` produces. Providers:

    fused       the automatic backend: Triton kernels on CUDA (patch embedding, masked attention,
                Cox loss); on CPU the C++ core (Cox), SDPA (attention) and, for patch embedding, the
                reference GEMM (Conv3d only where no gradient is recorded: its CPU backward is slow)
    reference   ``use_backend("reference")``: every lungcore op in plain PyTorch (the baseline)

Cases: CMML pretraining step, CMML fine-tuning step (Cox on PFS + OS), CSF-Net step. On CUDA the
models are full size (paper defaults: CMML 10.1 M parameters on 32 x 128 x 128 crops, CSF-Net
43.1 M parameters on 2 x 16 x 64 x 64) under bf16 autocast; on CPU they are the ``lungcore demo`` sizes in fp32 (the
CPU is not where these networks train). samples/s = batch * 1000 / median ms.

    python -m benchmarks.run --only train --device cpu --quick --out /tmp/bench
    python -m benchmarks.bench_train --device cuda          # table with samples/s and peak memory
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from benchmarks.harness import Case
from lungcore.backend import use_backend

NAME = "train"


def _survival_batch(b: int, crop: tuple[int, int, int], device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    clinical = torch.randn(b, 6, generator=g)
    for j, k in ((1, 2), (2, 3), (3, 2), (5, 3)):
        clinical[:, j] = torch.randint(0, k, (b,), generator=g).float()
    batch = {"ct": torch.randn(b, 1, *crop, generator=g), "clinical": clinical,
             "clinical_mask": torch.rand(b, 6, generator=g) > 0.1, "ct_mask": torch.ones(b, dtype=torch.bool)}
    for e in ("pfs", "os"):
        batch[f"{e}_time"] = torch.randint(1, 60, (b,), generator=g).float()
        batch[f"{e}_event"] = (torch.rand(b, generator=g) < 0.7).float()
        batch[f"{e}_mask"] = torch.ones(b, dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}


def _nodule_batch(b: int, crop: tuple[int, int, int], device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    clinical = torch.stack([torch.randint(0, k, (b,), generator=g).float() for k in (7, 3, 2, 5, 3, 2)], 1)
    batch = {"ct": torch.randn(b, 2, 1, *crop, generator=g), "clinical": clinical,
             "clinical_mask": torch.ones(b, 6, dtype=torch.bool), "ct_mask": torch.ones(b, 2, dtype=torch.bool),
             "label": torch.randint(0, 2, (b,), generator=g), "label_mask": torch.ones(b, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}


def _setups(device: str, quick: bool):
    """(label, model factory, batch, stage, batch size) per case."""
    from lungcore.models import create
    from lungcore.train.demo import CMML_SIZE, CSFNET_SIZE

    if device == "cuda":
        b_cmml, b_csf = 16, 16
        cmml = lambda: create("cmml")  # noqa: E731
        csf = lambda: create("csfnet")  # noqa: E731
        crop_cmml, crop_csf = (32, 128, 128), (16, 64, 64)
    else:
        b_cmml, b_csf = (8, 8) if quick else (32, 32)
        crop_cmml, crop_csf = (16, 32, 32), (8, 24, 24)
        cmml = lambda: create("cmml", img_size=crop_cmml, **CMML_SIZE)  # noqa: E731
        csf = lambda: create("csfnet", clinical_cardinalities=(7, 3, 2, 5, 3, 2), **CSFNET_SIZE)  # noqa: E731
    return [
        (f"cmml pretrain B={b_cmml} {crop_cmml}", cmml, _survival_batch(b_cmml, crop_cmml, device), "pretrain", b_cmml),
        (f"cmml finetune B={b_cmml} {crop_cmml}", cmml, _survival_batch(b_cmml, crop_cmml, device), "finetune", b_cmml),
        (f"csfnet B={b_csf} 2x{crop_csf}", csf, _nodule_batch(b_csf, crop_csf, device), "train", b_csf),
    ]


def _step_fn(model, batch: dict, stage: str, backend: str | None, device: str):
    from lungcore.train import TrainConfig
    from lungcore.train.schedule import optimizer

    opt = optimizer(model, TrainConfig(model=model.model_name, optim={"lr": 1e-4}))
    model.train()

    def step():
        with use_backend(backend), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            torch.manual_seed(0)  # same masks / dropout for every provider
            loss, _ = model.loss(batch, stage)
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _check(model, batch: dict, stage: str, device: str):
    """Before timing: the fused and reference losses of the same weights and masks agree."""
    def check() -> None:
        losses = []
        for backend in (None, "reference"):
            with torch.no_grad(), use_backend(backend), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                                                       enabled=device == "cuda"):
                torch.manual_seed(0)
                losses.append(float(model.loss(batch, stage)[0]))
        tol = 2e-2 if device == "cuda" else 1e-4
        assert abs(losses[0] - losses[1]) <= tol * max(1.0, abs(losses[1])), f"fused {losses[0]} != reference {losses[1]}"
    return check


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for label, factory, batch, stage, b in _setups(device, quick):
        torch.manual_seed(0)
        fused_model = factory().to(device)
        ref_model = factory().to(device)
        ref_model.load_state_dict(fused_model.state_dict())
        providers = {"fused": _step_fn(fused_model, batch, stage, None, device),
                     "reference": _step_fn(ref_model, batch, stage, "reference", device)}
        out.append(Case(shape=label, providers=providers, baseline="reference", size=float(b),
                        check=_check(fused_model, batch, stage, device),
                        note=f"samples/s = {b} * 1000 / median ms", extra={"batch": b}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    print("| case | provider | median ms | samples/s | peak memory MiB |")
    print("|---|---|---|---|---|")
    for label, factory, batch, stage, b in _setups(args.device, args.quick):
        for provider, backend in (("fused", None), ("reference", "reference")):
            torch.manual_seed(0)
            model = factory().to(args.device)
            step = _step_fn(model, batch, stage, backend, args.device)
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step()
            times = []
            for _ in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            label_mem = f"{peak:.0f}" + ("" if args.device == "cuda" else " (process peak RSS)")
            print(f"| {label} | {provider} | {ms:.1f} | {b * 1000 / ms:.1f} | {label_mem} |", flush=True)
            del model, step


if __name__ == "__main__":
    main()
