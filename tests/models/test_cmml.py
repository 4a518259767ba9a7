"""CMML (network A): shapes, gradients, Triton == reference, batch independence, missing
modality, save/load, registry contract. Tiny models only (the Triton interpreter runs here)."""
from __future__ import annotations

import pytest
import torch

from lungcore.backend import count_launches
from lungcore.models import available_models, create, load_model, save_model
from lungcore.models.cmml import CMML, CMMLConfig
from lungcore.models.slice_depth import group_layout

TINY = dict(img_size=(8, 16, 16), patch_size=(4, 8, 8), embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
            decoder_dim=8, decoder_depth=1, decoder_heads=2, clinical_dim=16, clinical_depth=1,
            clinical_heads=2, clinical_decoder_depth=1, relation_dim=4, fusion_heads=2)
CARDS = (0, 2, 3, 2, 0, 3)


def tiny(**kw) -> CMML:
    torch.manual_seed(0)
    return create("cmml", **{**TINY, **kw})


def make_batch(b: int, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clinical = torch.randn(b, len(CARDS), generator=g)
    for i, k in enumerate(CARDS):
        if k:
            clinical[:, i] = torch.randint(0, k, (b,), generator=g).float()
    batch = {
        "ct": torch.randn(b, 1, 8, 16, 16, generator=g),
        "ct_mask": torch.ones(b, dtype=torch.bool),
        "clinical": clinical,
        "clinical_mask": torch.rand(b, len(CARDS), generator=g) > 0.2,
        "pfs_time": torch.rand(b, generator=g) * 20,
        "pfs_event": (torch.rand(b, generator=g) < 0.7).float(),
        "pfs_mask": torch.ones(b, dtype=torch.bool),
        "os_time": torch.rand(b, generator=g) * 30,
        "os_event": (torch.rand(b, generator=g) < 0.6).float(),
        "os_mask": torch.ones(b, dtype=torch.bool),
    }
    batch["pfs_mask"][1] = False
    batch["os_event"][0] = 1.0
    batch["pfs_event"][0] = 1.0
    return {k: v.to(device) for k, v in batch.items()}


def test_registered_and_contract():
    assert "cmml" in available_models()
    m = tiny()
    assert isinstance(m, CMML) and m.task == "survival" and m.stages == ("pretrain", "finetune")
    defaults = CMMLConfig()
    assert defaults.img_size == (32, 128, 128) and defaults.patch_size == (4, 16, 16)
    assert (defaults.embed_dim, defaults.depth, defaults.num_heads) == (256, 6, 8)
    assert (defaults.clinical_dim, defaults.clinical_depth) == (256, 3)
    assert (defaults.mask_ratio_ct, defaults.mask_ratio_clinical, defaults.clinical_loss_weight) == (0.75, 0.3, 1.0)
    with pytest.raises(ValueError, match="stage"):
        m.loss(make_batch(3), "train")
    with pytest.raises(ValueError, match="unknown config"):
        create("cmml", no_such_field=1)


def test_default_model_tokens():
    m = CMML()
    assert m.ct_encoder.num_tokens == 512 and m.ct_encoder.grid == (8, 8, 8)


def test_group_layout_pads_each_group_to_longest():
    group = torch.tensor([[0, 1, 1, 2, 1], [2, 2, 0, 0, 0]])
    slot, mask, longest = group_layout(group, 3)
    assert longest == 3
    assert mask.tolist() == [[[True, False, False], [True, True, True], [True, False, False]],
                             [[True, True, True], [False, False, False], [True, True, False]]]
    for b in range(2):
        assert len(set(slot[b].tolist())) == 5  # distinct slots
        assert (slot[b] // longest).tolist() == group[b].tolist()


def test_grid_path_equals_padded_path():
    """All tokens as a view (fast path) == all tokens through the padded-group path."""
    m = tiny()
    ct = make_batch(2)["ct"]
    ids = torch.arange(m.ct_encoder.num_tokens).expand(2, -1)
    torch.testing.assert_close(m.ct_encoder(ct), m.ct_encoder(ct, ids), rtol=1e-5, atol=1e-6)
    # a shuffled visible order gives the same tokens, permuted
    perm = torch.stack([torch.randperm(m.ct_encoder.num_tokens) for _ in range(2)])
    full = m.ct_encoder(ct)
    torch.testing.assert_close(m.ct_encoder(ct, perm), torch.gather(full, 1, perm[..., None].expand(-1, -1, 16)),
                               rtol=1e-5, atol=1e-6)


def test_shapes_and_finite(device):
    m = tiny(full_mask_prob=0.0).to(device)  # no whole-modality masking: every patient keeps 2 visible tokens
    batch = make_batch(4, device)
    out = m(batch["ct"], batch["clinical"], batch["clinical_mask"], batch["ct_mask"])
    assert set(out) == {"pfs", "os"}
    assert out["pfs"].shape == (4,) and out["os"].shape == (4,)
    assert all(torch.isfinite(v).all() for v in out.values())
    losses = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], return_predictions=True)
    assert losses["ct_pred"].shape == (4, 8, 4 * 8 * 8) and losses["ct_target"].shape == (4, 8, 256)
    assert int(losses["ct_masked"].sum(1)[0]) == 6  # 8 tokens, ratio 0.75 -> 2 visible
    assert losses["numeric_pred"].shape == (4, 6)
    for stage in m.stages:
        loss, logs = m.loss(batch, stage)
        assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in logs


def test_bad_inputs():
    m = tiny()
    b = make_batch(2)
    with pytest.raises(ValueError, match="ct must have shape"):
        m(b["ct"][:, :, :4], b["clinical"], b["clinical_mask"])
    with pytest.raises(ValueError, match="clinical must have shape"):
        m(b["ct"], b["clinical"][:, :3], b["clinical_mask"])
    with pytest.raises(ValueError, match="img_size"):
        CMMLConfig(img_size=(9, 16, 16), patch_size=(4, 8, 8))
    with pytest.raises(ValueError, match="mask ratios"):
        CMMLConfig(mask_ratio_ct=1.0)


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def test_gradients_reach_every_parameter():
    m = tiny(modality_dropout=0.0)
    batch = make_batch(6)
    names = dict(m.named_parameters())
    # every variable masked for some patients (a random mask of 6 patients may miss a categorical head)
    checker = (torch.arange(6)[:, None] + torch.arange(len(CARDS))) % 2 == 0
    out = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"],
                            clinical_masked=checker & batch["clinical_mask"])
    pre = out["ct"] + out["clinical"]
    fin, _ = m.loss(batch, "finetune")
    (pre + fin).backward()
    missing = [n for n, p in names.items() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # the Cox partial likelihood is shift-invariant: the risk head's bias gets a zero gradient (up to
    # rounding, which the float64 C++ core may leave at exactly 0)
    assert set(missing) <= {"risk_head.bias"}, missing
    assert float(m.risk_head.bias.grad.abs().max()) < 1e-6


def test_finetune_gradients_reach_encoders():
    m = tiny(modality_dropout=0.0)
    loss, _ = m.loss(make_batch(6), "finetune")
    loss.backward()
    for prefix in ("ct_encoder.", "clinical_encoder.", "ct_from_clinical.", "clinical_from_ct.", "risk_head."):
        # the pretraining mask token is the one parameter fine-tuning does not use, and the risk head's
        # bias has a zero gradient (the Cox loss is shift-invariant)
        ps = [p for n, p in m.named_parameters() if n.startswith(prefix) and "mask_token" not in n
              and n != "risk_head.bias"]
        assert ps and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ps), prefix


def test_triton_equals_reference_forward_and_gradients(backend):
    """Every op forced to Triton (the interpreter on CPU) == the reference backend."""
    m = tiny(modality_dropout=0.0)
    batch = make_batch(3)
    vis = m.random_visible(3, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    cmask = m.random_clinical_mask(batch["clinical_mask"], generator=torch.Generator().manual_seed(2))
    results = {}
    for name in ("reference", "triton"):
        m.zero_grad()
        with backend(name), count_launches() as launches:
            risks = m(batch["ct"], batch["clinical"], batch["clinical_mask"], batch["ct_mask"])
            fin, _ = m.loss(batch, "finetune")
            pre = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], visible=vis,
                                    clinical_masked=cmask)
            (fin + pre["ct"] + pre["clinical"]).backward()
        results[name] = (risks, fin.detach(), pre["ct"].detach(), pre["clinical"].detach(),
                         {n: g.clone() for n, g in _grads(m).items()}, launches)
    ref, tri = results["reference"], results["triton"]
    assert sum(ref[5].values()) == 0
    kernels = " ".join(tri[5])
    assert "patch_embed" in kernels and "attention" in kernels and "cox" in kernels, dict(tri[5])
    for e in ("pfs", "os"):
        torch.testing.assert_close(tri[0][e], ref[0][e], rtol=1e-4, atol=1e-5)
    for i in (1, 2, 3):
        torch.testing.assert_close(tri[i], ref[i], rtol=1e-4, atol=1e-5)
    for n, g in ref[4].items():
        torch.testing.assert_close(tri[4][n], g, rtol=2e-3, atol=2e-5, msg=lambda s, n=n: f"{n}: {s}")


def test_batch_mates_do_not_change_a_risk():
    m = tiny().eval()
    batch = make_batch(5)
    alone = {k: v[:1] for k, v in batch.items()}
    r_all = m.predict(batch)
    r_one = m.predict(alone)
    other = make_batch(5, seed=7)
    mixed = {k: torch.cat([batch[k][:1], other[k][1:]]) for k in batch}
    mixed["ct_mask"][2] = False
    mixed["clinical_mask"][3] = False
    r_mixed = m.predict(mixed)
    for e in ("pfs", "os"):
        torch.testing.assert_close(r_one[e][0], r_all[e][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_mixed[e][0], r_all[e][0], rtol=1e-5, atol=1e-6)


def test_predict_restores_mode_and_no_grad():
    m = tiny().train()
    out = m.predict(make_batch(2))
    assert m.training and not out["pfs"].requires_grad


def test_missing_modality():
    m = tiny().eval()
    batch = make_batch(4)
    no_ct = dict(batch, ct_mask=torch.tensor([False, True, False, True]))
    no_cli = dict(batch, clinical_mask=torch.zeros(4, 6, dtype=torch.bool))
    neither = dict(no_ct, clinical_mask=torch.zeros(4, 6, dtype=torch.bool))
    full = m.predict(batch)
    r_ct = m.predict(no_ct)
    for out in (r_ct, m.predict(no_cli), m.predict(neither)):
        assert all(torch.isfinite(v).all() and v.shape == (4,) for v in out.values())
    # a patient without CT: its (garbage) voxels must not matter
    scrambled = dict(no_ct, ct=torch.where(no_ct["ct_mask"][:, None, None, None, None], batch["ct"],
                                           torch.randn_like(batch["ct"]) * 100))
    r_scr = m.predict(scrambled)
    for e in ("pfs", "os"):
        torch.testing.assert_close(r_scr[e], r_ct[e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_ct[e][1], full[e][1])
    # without a clinical record: the clinical values must not matter
    no_cli2 = dict(no_cli, clinical=torch.randn_like(batch["clinical"]).abs().round())
    for e in ("pfs", "os"):
        torch.testing.assert_close(m.predict(no_cli2)[e], m.predict(no_cli)[e], rtol=1e-5, atol=1e-6)
    # training losses with missing modalities stay finite
    m.train()
    for b in (no_ct, no_cli):
        for stage in m.stages:
            loss, _ = m.loss(b, stage)
            assert torch.isfinite(loss)


def test_pretrain_losses_only_count_masked_parts():
    m = tiny()
    batch = make_batch(3)
    vis = m.random_visible(3, torch.device("cpu"))
    cmask = torch.zeros(3, 6, dtype=torch.bool)
    out = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], visible=vis,
                            clinical_masked=cmask, return_predictions=True)
    assert float(out["clinical"].detach()) == 0.0
    # changing the voxels of a *visible* patch's target does not enter L_ct directly
    assert out["ct_masked"].sum() == 3 * 6
    # a patient without CT contributes nothing to L_ct
    out2 = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"],
                             ct_mask=torch.tensor([True, False, False]), visible=vis, clinical_masked=cmask,
                             return_predictions=True)
    assert out2["ct_masked"][1:].sum() == 0


def test_random_clinical_mask_only_masks_present():
    m = tiny()
    present = torch.tensor([[True] * 6, [False] * 6, [True, False, False, False, False, True]])
    masked = m.random_clinical_mask(present, ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert not (masked & ~present).any()
    assert masked.sum(1).tolist() == [3, 0, 1]


def test_save_load_roundtrip_with_baseline(tmp_path):
    m = tiny().eval()
    batch = make_batch(6)
    risks = m.predict(batch)
    m.fit_baseline(risks, batch)
    surv = m.survival(batch, [5.0, 10.0])
    assert surv["os"].shape == (6, 2) and ((surv["os"] >= 0) & (surv["os"] <= 1)).all()
    path = save_model(m, tmp_path / "cmml.pt", extra={"stage": "finetune"})
    m2, extra = load_model(path)
    m2.eval()
    assert extra == {"stage": "finetune"} and m2.config == m.config
    for e in ("pfs", "os"):
        torch.testing.assert_close(m2.predict(batch)[e], risks[e])
    for e in ("pfs", "os"):
        torch.testing.assert_close(m2.survival(batch, [5.0, 10.0])[e], surv[e])


def test_survival_without_baseline_raises():
    m = tiny()
    with pytest.raises(RuntimeError, match="fit_baseline"):
        m.survival(make_batch(2), [6.0])


def test_pretrain_then_finetune_learns_tiny_signal():
    """A few optimiser steps reduce both reconstruction losses and the Cox loss."""
    m = tiny(modality_dropout=0.0)
    batch = make_batch(16)
    batch["pfs_time"] = torch.exp(-batch["clinical"][:, 0]) * 5
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    vis = m.random_visible(16, torch.device("cpu"), generator=g)
    cm = m.random_clinical_mask(batch["clinical_mask"], generator=g)
    first = None
    for _ in range(15):
        out = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], visible=vis, clinical_masked=cm)
        loss = out["ct"] + out["clinical"]
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    first = None
    for _ in range(15):
        loss, _ = m.loss(batch, "finetune")
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


# ------------------------------------------------------------------ configured by the cohort (issue 15)
@pytest.mark.parametrize("cards", [(2, 0), (0, 2), (3, 0, 2, 0, 0), (0, 0), (4,)])
def test_any_order_of_numeric_and_categorical_variables(cards):
    """A numeric variable after the last categorical one used to index past the embedding table."""
    m = tiny(clinical_cardinalities=cards).eval()
    b, v = 5, len(cards)
    g = torch.Generator().manual_seed(1)
    clinical = torch.randn(b, v, generator=g)
    for i, k in enumerate(cards):
        if k:
            clinical[:, i] = torch.randint(0, k, (b,), generator=g).float()
    present = torch.ones(b, v, dtype=torch.bool)
    ct = torch.randn(b, 1, 8, 16, 16, generator=g)
    out = m(ct, clinical, present)
    assert all(torch.isfinite(r).all() for r in out.values())
    # every variable reaches the output, numeric ones through their value
    for i, k in enumerate(cards):
        changed = clinical.clone()
        changed[:, i] = (changed[:, i] + 1) % k if k else changed[:, i] + 1.0
        assert not torch.allclose(m(ct, changed, present)["os"], out["os"]), (i, k)


def test_one_endpoint_model():
    m = tiny(endpoints=("os",), modality_dropout=0.0)
    batch = make_batch(6)
    assert set(m.predict(batch)) == {"os"} and m.risk_head.out_features == 1
    loss, logs = m.loss(batch, "finetune")
    assert set(logs) == {"cox_os", "loss"} and logs["loss"] == pytest.approx(logs["cox_os"])
    m.fit_baseline(m.predict(batch), batch)
    assert set(m.survival(batch, [5.0, 10.0])) == {"os"}
    with pytest.raises(ValueError, match="endpoints"):
        CMMLConfig(endpoints=("os", "os"))
    with pytest.raises(ValueError, match="endpoints"):
        CMMLConfig(endpoints=("dfs",))


class _EncoderCalls:
    def __init__(self, module):
        self.rows = []
        module.register_forward_pre_hook(lambda mod, args: self.rows.append(int(args[0].shape[0])))


def test_clinical_only_patients_skip_the_ct_encoder():
    m = tiny(modality_dropout=0.0)
    calls = _EncoderCalls(m.ct_encoder)
    batch = make_batch(6)
    batch["ct_mask"] = torch.zeros(6, dtype=torch.bool)
    for stage in m.stages:
        loss, _ = m.loss(batch, stage)
        assert torch.isfinite(loss)
        loss.backward()
    m.predict(batch)
    assert calls.rows == []  # no CT encoder work at all for a clinical table
    assert all(p.grad is not None for n, p in m.clinical_encoder.named_parameters())
    # a mixed batch encodes exactly the patients with a CT
    batch["ct_mask"] = torch.tensor([True, False, True, False, False, False])
    m.loss(batch, "pretrain")
    assert calls.rows == [2, 2]  # intact tokens + visible tokens


def test_mixed_batch_equals_separate_batches():
    """In eval mode a patient's risk is the same whether its batch-mates have a CT or not."""
    m = tiny().eval()
    batch = make_batch(6)
    batch["ct_mask"] = torch.tensor([True, False, True, True, False, True])
    mixed = m.predict(batch)
    for keep in (batch["ct_mask"], ~batch["ct_mask"]):
        part = {k: v[keep] for k, v in batch.items()}
        alone = m.predict(part)
        for e in m.endpoints:
            torch.testing.assert_close(alone[e], mixed[e][keep], rtol=1e-5, atol=1e-6)
    # pretraining losses: CT reconstruction only over the patients with a CT
    g = torch.Generator().manual_seed(0)
    vis = m.random_visible(6, torch.device("cpu"), generator=g)
    cm = m.random_clinical_mask(batch["clinical_mask"], generator=g)
    out = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], batch["ct_mask"], visible=vis,
                            clinical_masked=cm, return_predictions=True)
    keep = batch["ct_mask"]
    sub = m.pretrain_losses(batch["ct"][keep], batch["clinical"][keep], batch["clinical_mask"][keep], None,
                            visible=vis[keep], clinical_masked=cm[keep], return_predictions=True)
    torch.testing.assert_close(out["ct"], sub["ct"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ct_pred"][keep], sub["ct_pred"], rtol=1e-5, atol=1e-6)
    assert float(out["ct_pred"][~keep].detach().abs().sum()) == 0 and not out["ct_masked"][~keep].any()


def test_config_from_cohort():
    from lungcore.data import ClinicalVariable, CohortSchema, PreprocessSettings

    schema = CohortSchema(kind="survival", endpoints=["os"], clinical=[
        ClinicalVariable("stage", "categorical", ["I", "II", "III"]), ClinicalVariable("age"),
        ClinicalVariable("site", "categorical", ["a"])])
    settings = PreprocessSettings(crop=(16, 64, 64))
    cfg = CMML.config_from_cohort(schema, settings)
    assert cfg == {"clinical_cardinalities": (3, 0, 2), "endpoints": ("os",), "img_size": (16, 64, 64)}
    assert "clinical_dim" not in cfg  # a branch width is never taken from the cohort
    model = create("cmml", **cfg)
    assert model.config.clinical_dim == CMMLConfig.clinical_dim
    # the user's values win where they do not contradict the cohort
    assert CMML.config_from_cohort(schema, settings, {"clinical_dim": 64})["clinical_dim"] == 64
    with pytest.raises(ValueError, match=r"model_overrides.img_size = \(32, 128, 128\) contradicts "
                                         r"data.preprocess.crop = \(16, 64, 64\)"):
        CMML.config_from_cohort(schema, settings, {"img_size": [32, 128, 128]})
    with pytest.raises(ValueError, match="clinical_cardinalities"):
        CMML.config_from_cohort(schema, settings, {"clinical_cardinalities": (0, 2, 3)})
    with pytest.raises(ValueError, match=r"\['pfs'\] cannot be trained without data"):
        CMML.config_from_cohort(schema, settings, {"endpoints": ("pfs", "os")})
    with pytest.raises(ValueError, match=r"crop \(10, 64, 64\) must be a multiple of CMML's patch_size"):
        CMML.config_from_cohort(schema, PreprocessSettings(crop=(10, 64, 64)))


# --------------------------------------------------------------------------------------------
# fine-tuning fusion = the pretrained completion layers; a missing modality is completed
def _reference_features(m, batch, ct_attn, ct_norm, cli_attn, cli_norm):
    """Head features of patients with both modalities, written out from the fusion layers given."""
    ct_tok = m.ct_encoder(batch["ct"])
    cli_tok, keys = m.clinical_encoder(batch["clinical"], batch["clinical_mask"])
    ct2 = ct_tok + ct_attn(ct_norm(ct_tok), cli_tok, key_mask=keys)
    cli2 = cli_tok + cli_attn(cli_norm(cli_tok), ct_tok)
    return torch.cat([ct2.mean(1), cli2[:, 0]], dim=-1)


def _features(m, batch):
    """The fused features of ``m.predict(batch)`` (B, E + C: CT pool, clinical readout) before the head's norm."""
    seen = []
    h = m.head_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    try:
        m.predict(batch)
    finally:
        h.remove()
    return seen[0]


def _pretrain_step(m, batch):
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    loss, _ = m.loss(batch, "pretrain")
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_finetuning_fuses_with_the_pretrained_completion_layers():
    m = tiny(modality_dropout=0.0)
    batch = make_batch(5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _pretrain_step(m, batch)
    state = m.state_dict()
    assert not any(k.startswith("fuse_") for k in state)  # no fresh fusion layers exist
    for name in ("ct_from_clinical.", "clinical_from_ct.", "ct_mask_token"):  # pretraining trained them
        assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith(name)), name
    # a fine-tuning model built from the pretrained weights fuses with exactly those tensors
    ft = tiny(modality_dropout=0.0)
    ft.load_state_dict(state)
    for k in state:
        if k.startswith(("ct_from_clinical", "clinical_from_ct")):
            assert torch.equal(ft.state_dict()[k], state[k])
    ft.eval()
    with torch.no_grad():
        ref = _reference_features(ft, batch, ft.ct_from_clinical, ft.ct_from_clinical_norm, ft.clinical_from_ct,
                                  ft.clinical_from_ct_norm)
    torch.testing.assert_close(_features(ft, batch), ref, rtol=1e-5, atol=1e-6)
    # and perturbing a pretrained completion layer changes the fine-tuned risks
    r0 = ft.predict(batch)["os"]
    with torch.no_grad():
        ft.ct_from_clinical.out_proj.weight.add_(0.5)
    assert not torch.allclose(ft.predict(batch)["os"], r0)


def test_fresh_fusion_option_ignores_the_pretrained_layers():
    m = tiny(fusion_init="fresh", modality_dropout=0.0).eval()
    batch = make_batch(5)
    assert any(k.startswith("fuse_ct.") for k in m.state_dict())
    with torch.no_grad():
        ref = _reference_features(m, batch, m.fuse_ct, m.fuse_ct_norm, m.fuse_clinical, m.fuse_clinical_norm)
    torch.testing.assert_close(_features(m, batch), ref, rtol=1e-5, atol=1e-6)
    r0 = m.predict(batch)["pfs"]
    with torch.no_grad():
        for p in (*m.ct_from_clinical.parameters(), *m.clinical_from_ct.parameters()):
            p.add_(1.0)
    torch.testing.assert_close(m.predict(batch)["pfs"], r0)  # both modalities present: not used
    # fine-tuning trains the fresh layers
    m.train()
    loss, _ = m.loss(batch, "finetune")
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fuse_ct.parameters())
    with pytest.raises(ValueError, match="fusion_init"):
        tiny(fusion_init="new")
    with pytest.raises(ValueError, match="missing_modality"):
        tiny(missing_modality="impute")
    with pytest.raises(ValueError, match="full_mask_prob"):
        tiny(full_mask_prob=1.5)


def test_patient_without_ct_gets_completed_tokens():
    m = tiny().eval()
    batch = make_batch(4)
    batch["ct_mask"] = torch.tensor([False, True, False, True])
    e = m.config.embed_dim
    feats = _features(m, batch)
    # reference: mask tokens + positions completed from the clinical tokens, pooled
    with torch.no_grad():
        cli_tok, keys = m.clinical_encoder(batch["clinical"], batch["clinical_mask"])
        ref = m.complete_ct(m.ct_mask_tokens(4), cli_tok, keys).mean(1)
    torch.testing.assert_close(feats[[0, 2], :e], ref[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats[[0, 2], e:], cli_tok[[0, 2], 0], rtol=1e-5, atol=1e-6)  # no CT to attend to
    # it depends on the clinical values
    other = dict(batch, clinical=batch["clinical"].flip(0))
    assert not torch.allclose(_features(m, other)[0, :e], feats[0, :e])
    # zero-fill option: the earlier behaviour (zero CT pool, readout untouched), a different risk
    zero = tiny(missing_modality="zero").eval()
    zf = _features(zero, batch)
    with torch.no_grad():
        old = torch.cat([torch.zeros(4, e), zero.clinical_encoder(batch["clinical"], batch["clinical_mask"])[0][:, 0]], -1)
    torch.testing.assert_close(zf[[0, 2]], old[[0, 2]], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(zero.predict(batch)["pfs"][[0, 2]], m.predict(batch)["pfs"][[0, 2]])
    torch.testing.assert_close(zero.predict(batch)["pfs"][[1, 3]], m.predict(batch)["pfs"][[1, 3]])


def test_patient_without_clinical_record_gets_completed_values():
    m = tiny()
    batch = make_batch(4)
    _pretrain_step(m, batch)
    m.eval()
    batch["clinical_mask"][[1, 2]] = False
    out = m.predict(batch)
    # reference: the pretrained path written out (fully masked record + cross-attention to the CT +
    # graph decoder), its values then given to the model as an ordinary record
    with torch.no_grad():
        everything = torch.ones_like(batch["clinical_mask"])
        tok, keys = m.clinical_encoder(torch.zeros_like(batch["clinical"]), everything, everything)
        ct_tok = m.ct_encoder(batch["ct"])
        tok = tok + m.clinical_from_ct(m.clinical_from_ct_norm(tok), ct_tok)
        numeric, logits = m.decode_clinical(tok, keys)
    values = torch.stack([numeric[:, i] if k == 0 else logits[i].argmax(1).float() for i, k in enumerate(CARDS)], 1)
    assert all(0 <= values[:, i].min() and values[:, i].max() < k for i, k in enumerate(CARDS) if k)
    filled = dict(batch, clinical=batch["clinical"].clone(), clinical_mask=batch["clinical_mask"].clone())
    filled["clinical"][[1, 2]] = values[[1, 2]]
    filled["clinical_mask"][[1, 2]] = True
    ref = m.predict(filled)
    for e in m.endpoints:
        torch.testing.assert_close(out[e], ref[e], rtol=1e-5, atol=1e-6)
    # the completed record depends on the CT; the record's own (absent) values never matter
    with torch.no_grad():
        assert not torch.allclose(m.complete_record(ct_tok.flip(0))[1], m.complete_record(ct_tok)[1])
    garbage = dict(batch, clinical=torch.where(batch["clinical_mask"], batch["clinical"], torch.full_like(batch["clinical"], 7.0)))
    torch.testing.assert_close(m.predict(garbage)["os"], out["os"])
    zero = tiny(missing_modality="zero")
    zero.load_state_dict(m.state_dict())  # the same weights, zero-filled
    zero.eval()
    assert not torch.allclose(zero.predict(batch)["os"][[1, 2]], out["os"][[1, 2]])
    torch.testing.assert_close(zero.predict(batch)["os"][[0, 3]], out["os"][[0, 3]])
    # fine-tuning on patients without a record trains the numeric reconstruction through the risk
    m.train()
    loss, _ = m.loss(dict(batch, clinical_mask=torch.zeros_like(batch["clinical_mask"])), "finetune")
    loss.backward()
    assert m.numeric_head.grad.abs().sum() > 0 and m.clinical_from_ct.out_proj.weight.grad.abs().sum() > 0


def test_completion_gradients():
    """Without a CT, fine-tuning trains the completion path (mask token, positions, CT <- clinical
    attention, clinical encoder) and not the CT encoder's blocks; zero-fill never uses the mask token."""
    for mode in ("complete", "zero"):
        m = tiny(missing_modality=mode, modality_dropout=0.0)
        batch = make_batch(6)
        batch["ct_mask"] = torch.zeros(6, dtype=torch.bool)
        loss, _ = m.loss(batch, "finetune")
        loss.backward()
        used = m.ct_mask_token.grad is not None and m.ct_mask_token.grad.abs().sum() > 0
        assert used == (mode == "complete")
        if mode == "complete":
            assert m.ct_encoder.embed.pos_embed.grad.abs().sum() > 0
            assert all(p.grad.abs().sum() > 0 for p in m.ct_from_clinical.parameters())
        assert all(p.grad is None for p in m.ct_encoder.blocks.parameters())
        assert m.clinical_encoder.readout.grad.abs().sum() > 0


def test_pretraining_masks_whole_modalities():
    m = tiny(full_mask_prob=1.0)
    batch = make_batch(4)
    out = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], return_predictions=True)
    assert out["ct_masked"].all()  # every CT token masked
    assert torch.equal(out["clinical_masked"], batch["clinical_mask"])  # every present variable masked
    # a fully masked CT is reconstructed from the clinical record alone: the voxels do not matter ...
    vis = m.random_visible(4, torch.device("cpu"))
    everything = torch.ones(4, dtype=torch.bool)
    cm = torch.zeros_like(batch["clinical_mask"])
    a = m.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], visible=vis,
                          clinical_masked=cm, ct_all_masked=everything, return_predictions=True)
    b = m.pretrain_losses(torch.randn_like(batch["ct"]), batch["clinical"], batch["clinical_mask"], visible=vis,
                          clinical_masked=cm, ct_all_masked=everything, return_predictions=True)
    torch.testing.assert_close(a["ct_pred"], b["ct_pred"])
    # ... the clinical values do, and L_ct trains the completion path
    c = m.pretrain_losses(batch["ct"], batch["clinical"].flip(0), batch["clinical_mask"].flip(0), visible=vis,
                          clinical_masked=cm, ct_all_masked=everything, return_predictions=True)
    assert not torch.allclose(a["ct_pred"], c["ct_pred"])
    a["ct"].backward()
    assert m.ct_mask_token.grad.abs().sum() > 0 and m.ct_from_clinical_norm.weight.grad.abs().sum() > 0
    # the default draws whole-modality masks for some patients only; 0 never
    full = m.random_clinical_mask(batch["clinical_mask"], full=torch.tensor([True, False, False, False]))
    assert torch.equal(full[0], batch["clinical_mask"][0])
    m0 = tiny(full_mask_prob=0.0)
    for _ in range(5):
        out = m0.pretrain_losses(batch["ct"], batch["clinical"], batch["clinical_mask"], return_predictions=True)
        assert not out["ct_masked"].all(dim=1).any()


def test_old_behaviour_via_options():
    """fusion_init="fresh" + missing_modality="zero" is the fine-tuning forward of the CMML before
    pretrained fusion (fresh fuse_* layers, zero CT pool without a CT, identity-only record tokens)."""
    m = tiny(fusion_init="fresh", missing_modality="zero").eval()
    batch = make_batch(5)
    batch["ct_mask"] = torch.tensor([True, False, True, True, False])
    batch["clinical_mask"][2] = False
    with torch.no_grad():
        cli_tok, keys = m.clinical_encoder(batch["clinical"], batch["clinical_mask"])
        ct_tok = m.ct_encoder(batch["ct"])
        ct2 = ct_tok + m.fuse_ct(m.fuse_ct_norm(ct_tok), cli_tok, key_mask=keys)
        cli2 = cli_tok + m.fuse_clinical(m.fuse_clinical_norm(cli_tok), ct_tok)
        has = batch["ct_mask"][:, None]
        pool = torch.where(has, ct2.mean(1), torch.zeros_like(ct2[:, 0]))
        readout = torch.where(has, cli2[:, 0], cli_tok[:, 0])
        ref = m.risk_head(m.head_norm(torch.cat([pool, readout], -1)))
    out = m.predict(batch)
    torch.testing.assert_close(out["pfs"], ref[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["os"], ref[:, 1], rtol=1e-5, atol=1e-6)


def test_checkpoint_from_before_pretrained_fusion_fails_clearly(tmp_path):
    path = save_model(tiny(), tmp_path / "new.pt")
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    state["decoder_mask_token"] = torch.zeros(TINY["decoder_dim"])  # the earlier layout
    del state["ct_mask_token"]
    for k, v in tiny(fusion_init="fresh").state_dict().items():
        if k.startswith("fuse_"):
            state[k] = v
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="old.pt.*before the pretrained fusion.*retrain"):
        load_model(tmp_path / "old.pt")
