"""DDP on 2 CPU processes (gloo): the Cox risk sets span both ranks, so each rank's loss and the
averaged parameter gradients equal one process training on the concatenated batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).parent

CMML_TINY = dict(img_size=(4, 8, 8), patch_size=(2, 4, 4), embed_dim=16, depth=1, num_heads=2, decoder_dim=8,
                 decoder_depth=1, decoder_heads=2, clinical_dim=16, clinical_depth=1, clinical_heads=2,
                 clinical_decoder_depth=1, fusion_heads=2, modality_dropout=0.0)


def _model(name: str):
    sys.path.insert(0, str(HERE))
    import toy  # noqa: F401
    from lungcore.models import create

    torch.manual_seed(0)
    if name == "cmml":
        return create("cmml", **CMML_TINY)
    return create("toy_survival", cardinalities=[0, 2, 3, 2, 0, 3])


def _batch(n: int = 10) -> dict:
    g = torch.Generator().manual_seed(1)
    clinical = torch.randn(n, 6, generator=g)
    clinical[:, [1, 3]] = torch.randint(0, 2, (n, 2), generator=g).float()
    clinical[:, [2, 5]] = torch.randint(0, 3, (n, 2), generator=g).float()
    time = torch.rand(n, generator=g) * 10
    time[3] = time[7]  # a tie across the two ranks
    return {"ct": torch.randn(n, 1, 4, 8, 8, generator=g), "clinical": clinical,
            "clinical_mask": torch.rand(n, 6, generator=g) > 0.2, "ct_mask": torch.ones(n, dtype=torch.bool),
            "pfs_time": time, "pfs_event": (torch.rand(n, generator=g) > 0.3).float(),
            "pfs_mask": torch.tensor([True] * (n - 1) + [False]), "os_time": time + 1,
            "os_event": (torch.rand(n, generator=g) > 0.4).float(), "os_mask": torch.ones(n, dtype=torch.bool),
            "id": [str(i) for i in range(n)]}


def _worker(rank: int, world: int, init: str, name: str, out: str) -> None:
    import torch.distributed as dist

    from lungcore.train import distributed as dist_utils

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.use_deterministic_algorithms(True)
    model = _model(name)
    full = _batch()
    rows = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal shards
    part = {k: v[rows] for k, v in full.items()}
    wrapped = dist_utils.wrap(model, torch.device("cpu"))
    with dist_utils.cross_rank_cox(model, True):
        loss, _ = wrapped(part, "finetune")
        loss.backward()
    torch.save({"loss": loss.detach(), "grads": {k: p.grad for k, p in model.named_parameters()
                                                   if p.grad is not None}}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["toy", "cmml"])
def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path, name):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", name, out), nprocs=2, join=True)
    model = _model(name)
    loss, _ = model.loss(_batch(), "finetune")
    loss.backward()
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ranks[0]["grads"])
    for k, g in grads.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_fit_under_torchrun_two_cpu_processes(tmp_path, survival_cohort, cache_dir):
    from conftest import tiny_config

    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1, device="cpu")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "_run_fit.py"), str(tmp_path / "cfg.json"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "world size 2" in log and "test:" in log
    assert (tmp_path / "run" / "best.pt").is_file()
