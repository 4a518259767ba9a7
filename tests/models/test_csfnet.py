"""CSF-Net (network B) with a tiny configuration: shapes, gradients, backends, batch independence,
training contract, save/load, input checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lungcore.backend import count_launches
from lungcore.models import CSFNet, CSFNetConfig, create, load_model, save_model
from lungcore.models.csfnet import parameter_groups

TINY = CSFNetConfig.tiny_overrides()
CROP = (8, 16, 16)


def _batch(b: int, device, seed: int = 0, v: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    cards = TINY["clinical_cardinalities"]
    clinical = torch.stack([torch.randint(0, c, (b,), generator=g) for c in cards], dim=1).float()
    mask = torch.rand(b, v, generator=g) > 0.25
    mask[0] = True
    clinical = clinical * mask
    return {"ct": torch.randn(b, 2, 1, *CROP, generator=g).to(device),
            "ct_mask": torch.ones(b, 2, dtype=torch.bool, device=device),
            "clinical": clinical.to(device), "clinical_mask": mask.to(device),
            "label": torch.randint(0, 2, (b,), generator=g).to(device),
            "label_mask": torch.ones(b, dtype=torch.bool, device=device)}


def _model(device, seed: int = 0, **kw) -> CSFNet:
    torch.manual_seed(seed)
    return create("csfnet", **{**TINY, **kw}).to(device)


def test_registered_and_contract():
    net = create("csfnet", **TINY)
    assert isinstance(net, CSFNet) and net.model_name == "csfnet"
    assert net.task == "classification" and net.stages == ("train",)
    cfg = CSFNetConfig()
    assert (cfg.lr, cfg.betas, cfg.batch_size, cfg.epochs) == (1e-4, (0.5, 0.999), 4, 100)
    assert cfg.scheduler == "cosine_warm_restarts" and cfg.fusion_init == (0.3, 0.7)
    opt, sched = net.make_optimizer(steps_per_epoch=3)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.5, 0.999)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)


def test_published_parameter_count_and_shapes():
    # the docstring's number; the published 16 x 64 x 64 crop -> 512 x 2 x 8 x 8 per scan
    net = CSFNet()
    assert parameter_groups(net)["total"] == sum(p.numel() for p in net.parameters()) == CSFNET_PARAMS
    f = net.encoder(torch.zeros(1, 1, 16, 64, 64))
    assert f.shape == (1, 512, 2, 8, 8)
    assert torch.sigmoid(net.fusion.w0).item() == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item())


CSFNET_PARAMS = 80_486_073


@pytest.mark.parametrize("variant", [{}, {"t1_only": True}, {"use_clinical": False}])
def test_output_shapes(device, variant):
    net = _model(device, **variant).eval()
    batch = _batch(3, device)
    out = net(batch["ct"], batch["clinical"], batch["clinical_mask"])
    assert out["logits"].shape == (3, 2) and torch.isfinite(out["logits"]).all()
    pred = net.predict(batch)
    assert pred["logits"].shape == (3, 2) and pred["probability"].shape == (3,)
    assert ((pred["probability"] >= 0) & (pred["probability"] <= 1)).all()
    loss, logs = net.loss(batch, "train")
    assert loss.dim() == 0 and torch.isfinite(loss) and {"loss", "accuracy"} <= set(logs)


@pytest.mark.parametrize("variant", [{}, {"t1_only": True}, {"use_clinical": False}])
def test_gradients_reach_every_parameter(device, variant):
    net = _model(device, **variant).train()
    batch = _batch(4, device)
    loss, _ = net.loss(batch, "train")
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"
    if not variant.get("use_clinical", True):
        assert not any(n.startswith("clinical") for n, _ in net.named_parameters())


def test_numeric_clinical_variable(device):
    # lungcore schemas may hold numeric variables (cardinality 0): they get a value-scaled token
    net = _model(device, clinical_cardinalities=(0, 2, 4, 2, 2, 2)).train()
    batch = _batch(3, device)
    batch["clinical"][:, 0] = torch.tensor([0.5, -1.2, 2.0], device=device)
    net.loss(batch, "train")[0].backward()
    assert net.clinical_embed.numeric_weight.grad.abs().sum() > 0


def test_prediction_independent_of_batch_mates(device):
    """The published defect (attention across the patients of a batch) is fixed."""
    net = _model(device).eval()
    a, b = _batch(4, device, seed=1), _batch(4, device, seed=2)
    mixed = {k: torch.cat([a[k][:1], b[k][1:]]) for k in a}
    alone = {k: a[k][:1] for k in a}
    pa, pm, p1 = net.predict(a)["logits"][0], net.predict(mixed)["logits"][0], net.predict(alone)["logits"][0]
    torch.testing.assert_close(pm, pa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, pa, rtol=1e-5, atol=1e-6)
    # and the prediction does depend on the patient's own clinical data
    other = {k: v.clone() for k, v in alone.items()}
    other["clinical"] = (other["clinical"] + 1) % 2
    assert not torch.allclose(net.predict(other)["logits"], p1[None])


def test_missing_clinical_and_missing_t0(device):
    net = _model(device).eval()
    batch = _batch(2, device)
    batch["clinical_mask"][1] = False          # no clinical variable at all: finite output
    batch["clinical"][1] = 0
    batch["ct_mask"][1, 0] = False             # no prior scan: T0 replaced by T1
    out = net.predict(batch)["logits"]
    assert torch.isfinite(out).all()
    same = {k: v.clone() for k, v in batch.items()}
    same["ct"][1, 0] = same["ct"][1, 1]
    same["ct_mask"][1, 0] = True
    torch.testing.assert_close(net.predict(same)["logits"], out)
    # masked variables are ignored whatever their value
    junk = {k: v.clone() for k, v in batch.items()}
    junk["clinical"][~junk["clinical_mask"]] = 1.0
    torch.testing.assert_close(net.predict(junk)["logits"], out)


def test_triton_backend_equals_reference(backend, device):
    """Triton attention kernels (interpreter on CPU) == reference backend, forward and gradients."""
    torch.manual_seed(0)
    net = create("csfnet", **TINY).to(device).train()
    for mod in net.modules():  # batch statistics would make two forwards differ: freeze BN
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.eval()
    batch = _batch(2, device, seed=3)
    # fp32 everywhere in the interpreter; tf32 tl.dot on a GPU (DESIGN.md tolerances)
    rtol, atol = (1e-5, 1e-6) if device == "cpu" else (2e-3, 1e-5)

    def run(name):
        net.zero_grad(set_to_none=True)
        with backend(name):
            loss, _ = net.loss(batch, "train")
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    ref_loss, ref_grads = run("reference")
    with count_launches() as launches:
        tri_loss, tri_grads = run("triton")
    assert sum(v for k, v in launches.items() if k.startswith("masked_cross_attention")) >= 4, launches
    torch.testing.assert_close(tri_loss, ref_loss, rtol=rtol, atol=atol)
    for n in ref_grads:
        torch.testing.assert_close(tri_grads[n], ref_grads[n], rtol=10 * rtol, atol=10 * atol,
                                   msg=lambda m: f"{n}: {m}")


def test_save_load_roundtrip(tmp_path, device):
    net = _model(device, t1_only=True).eval()
    batch = _batch(2, device)
    path = save_model(net, tmp_path / "csfnet.pt", extra={"auc": 0.9})
    loaded, extra = load_model(path)
    loaded = loaded.to(device).eval()
    assert isinstance(loaded, CSFNet) and extra == {"auc": 0.9}
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(net.config) and loaded.config.t1_only
    torch.testing.assert_close(loaded.predict(batch)["logits"], net.predict(batch)["logits"])


def test_bad_inputs_are_named():
    net = create("csfnet", **TINY)
    b = _batch(2, "cpu")
    with pytest.raises(ValueError, match="ct"):
        net(b["ct"][:, :1], b["clinical"], b["clinical_mask"])
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(2, 2, 1, 8, 12, 16), b["clinical"], b["clinical_mask"])
    with pytest.raises(ValueError, match="clinical"):
        net(b["ct"], b["clinical"][:, :5], b["clinical_mask"])
    with pytest.raises(TypeError, match="clinical_mask"):
        net(b["ct"], b["clinical"], b["clinical_mask"].float())
    with pytest.raises(ValueError, match="stage"):
        net.loss(b, "pretrain")
    with pytest.raises(ValueError, match="unknown config"):
        create("csfnet", widht=3)
    with pytest.raises(ValueError, match="stage_blocks"):
        CSFNetConfig(stage_blocks=(1, 1))


def test_loss_skips_unlabelled_and_predict_keeps_mode(device):
    net = _model(device).train()
    for mod in net.modules():  # same statistics for both forwards
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.eval()
    batch = _batch(4, device)
    batch["label_mask"][2:] = False
    batch["label"][2:] = -1
    loss, logs = net.loss(batch, "train")
    head = {k: v[:2] for k, v in batch.items()}
    torch.testing.assert_close(loss, net.loss(head, "train")[0])
    assert logs["n"] == 2.0
    none = {**batch, "label_mask": torch.zeros(4, dtype=torch.bool, device=device)}
    empty, logs = net.loss(none, "train")
    assert empty.item() == 0.0 and empty.requires_grad and logs["n"] == 0.0
    net.predict(batch)
    assert net.training
