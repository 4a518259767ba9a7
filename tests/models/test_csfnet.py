"""CSF-Net (network B) with a tiny configuration: shapes, gradients, backends, batch independence,
training contract, save/load, input checks."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lungcore.backend import count_launches
from lungcore.models import CSFNet, CSFNetConfig, create, load_model, save_model
from lungcore.train import TrainConfig
from lungcore.train.schedule import apply_recipe, optimizer, set_lr, stage_lr
from lungcore.models.csfnet import (PUBLISHED_STAGES, ResidualBlock3d, ResidualCBAM3d, TemporalResidualFusion,
                                    parameter_groups)

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
    # the authors' sibling training script (hdusyz/Med-STLPN train_cls.py): Adam 1e-4, default betas,
    # cosine 1 -> 0.1 over 25 epochs, batch 1
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-4, (0.9, 0.999), 0.0, 1, 25)
    assert cfg.scheduler == "cosine" and cfg.min_lr_ratio == 0.1 and cfg.fusion_init == (0.3, 0.7)
    assert cfg.fusion == "tokens" and cfg.stages == PUBLISHED_STAGES
    opt = optimizer(net, apply_recipe(TrainConfig(model="csfnet", recipe="paper"), net))
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.999)
    restarts = create("csfnet", **TINY, scheduler="cosine_warm_restarts").paper_recipe()
    assert (restarts["schedule"], restarts["min_lr_ratio"]) == ("restarts", 0.0)


def test_cosine_schedule_matches_the_authors_lambda():
    """At every epoch boundary the per-step cosine of ``recipe: paper`` (what ``lungcore train``
    steps) equals the authors' per-epoch ``LambdaLR(lambda e: (1 + cos(pi * e / epochs)) / 2 * 0.9 + 0.1)``."""
    steps, epochs = 4, 25
    net = create("csfnet", **TINY, epochs=epochs)
    paper = apply_recipe(TrainConfig(model="csfnet", recipe="paper"), net)
    opt, lr_at = optimizer(net, paper), stage_lr(paper.optim, steps, epochs)
    for step in range(epochs * steps + 3):
        set_lr(opt, lr_at(step))
        if step % steps == 0:
            e = min(step // steps, epochs)
            want = 1e-4 * ((1 + math.cos(e * math.pi / epochs)) / 2 * 0.9 + 0.1)
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), step
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)  # stays at the floor past the end


def _published_encoder_reference(layers, stem=4, in_channels=1):
    """Independent reading of the published ``ConvRes_table`` encoder: the shapes of its parameters in
    construction order (conv weight, conv bias if any, BN weight, BN bias; CBAM linears and conv)."""
    shapes = []

    def conv(cin, cout, k, bias=True):
        shapes.append((cout, cin, k, k, k))
        if bias:
            shapes.append((cout,))
        shapes.extend([(cout,), (cout,)])          # BatchNorm3d weight, bias

    def cbam(c):
        shapes.extend([(c // 4, c), (c, c // 4), (1, 2, 5, 5, 5)])

    conv(in_channels, stem, 3)
    conv(stem, stem, 3)
    cbam(stem)
    last = stem
    for stage in layers:
        conv(last, last, 3, bias=False)            # conv3d_pooling: stride 2, keeps the width, no bias
        for width in stage:                        # ResidualBlock(last, width): conv1, conv2, 1x1 shortcut
            conv(last, width, 3)
            conv(width, width, 3)
            conv(last, width, 1)
            last = width
        cbam(last)
    return shapes


def test_published_layer_list_shapes_and_parameter_count():
    published = [[64, 64, 64], [128, 128, 256], [256, 256, 256, 512]]   # as in models/res_cnn.py
    net = CSFNet(CSFNetConfig(stages=published)).eval()
    assert net.config.stages == PUBLISHED_STAGES
    ref = _published_encoder_reference(published)
    enc = net.encoder
    # same parameters in the same order (our block registers body then shortcut, as published conv1,
    # conv2, conv3 are *declared*; the stem convs and CBAMs likewise)
    assert [tuple(p.shape) for p in enc.parameters()] == ref
    count = sum(math.prod(s) for s in ref)
    assert count == 28_455_964 == sum(p.numel() for p in enc.parameters()) == parameter_groups(net)["encoder"]
    with torch.no_grad():
        outs = enc.stage_outputs(torch.zeros(1, 1, 16, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(4, 16, 64, 64), (64, 8, 32, 32), (256, 4, 16, 16), (512, 2, 8, 8)]
    groups = parameter_groups(net)
    assert groups["fusion"] == 1024 * 512 * 27 + 512 + 2          # conv with bias, no BN; w0, w1
    assert groups["total"] == CSFNET_PARAMS["tokens"]
    assert torch.sigmoid(net.fusion.w0).item() == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item())


CSFNET_PARAMS = {"tokens": 43_117_344, "published": 43_150_752, "t1_only": 28_961_054, "image_only": 42_875_296}


@pytest.mark.parametrize("variant", ["published", "t1_only", "image_only"])
def test_variant_parameter_counts(variant):
    kw = {"published": {"fusion": "published"}, "t1_only": {"t1_only": True},
          "image_only": {"use_clinical": False}}[variant]
    with torch.device("meta"):
        net = CSFNet(CSFNetConfig(**kw))
    assert sum(p.numel() for p in net.parameters()) == CSFNET_PARAMS[variant]


def test_residual_cbam_as_published():
    torch.manual_seed(0)
    cbam = ResidualCBAM3d(8, reduction=4, kernel=5)
    x = torch.randn(2, 8, 4, 6, 6)
    # the channel MLP is C -> C/4 -> C, bias-free, with no activation between: a linear map
    assert [tuple(m.weight.shape) for m in cbam.mlp] == [(2, 8), (8, 2)] and all(m.bias is None for m in cbam.mlp)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(cbam.mlp(a + 2 * b), cbam.mlp(a) + 2 * cbam.mlp(b))
    assert cbam.spatial.kernel_size == (5, 5, 5) and cbam.spatial.bias is None
    # out = spatial * x + x: with a zero spatial conv (sigmoid 0.5) the output is 1.5 x whatever the
    # channel attention did (lungcore's old layer gave x + 0.5 * channel(x) * x)
    with torch.no_grad():
        cbam.spatial.weight.zero_()
    torch.testing.assert_close(cbam(x), 1.5 * x)


def test_residual_block_always_projects_and_sums_plainly():
    torch.manual_seed(0)
    block = ResidualBlock3d(6, 6).eval()
    kinds = [type(m).__name__ for m in block.shortcut]
    assert kinds == ["Conv3d", "BatchNorm3d", "ReLU"] and block.shortcut[0].kernel_size == (1, 1, 1)
    x = torch.randn(2, 6, 4, 4, 4)
    torch.testing.assert_close(block(x), block.body(x) + block.shortcut(x))


def test_temporal_fusion_as_published():
    torch.manual_seed(0)
    fusion = TemporalResidualFusion(4)
    f0, f1 = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 4, 2, 8, 8)
    # the published module, spelled with torch.nn layers: Upsample x2 (trilinear, align_corners=True),
    # AdaptiveAvgPool3d((2, 8, 8)), Conv3d 2C -> C (bias, no BN)
    up = torch.nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)
    pool = torch.nn.AdaptiveAvgPool3d((2, 8, 8))
    conv = fusion.conv(pool(up(torch.cat([f0, f1], dim=1))))
    want = torch.sigmoid(torch.tensor(0.3)) * conv + torch.sigmoid(torch.tensor(0.7)) * f1
    torch.testing.assert_close(fusion(f0, f1), want)
    assert fusion.conv.bias is not None and sum(p.numel() for p in fusion.parameters()) == 8 * 4 * 27 + 4 + 2


def test_published_fusion_attends_one_key_per_patient():
    """Per patient, the published fusion's attentions have one key each: the image half of its output
    ignores the clinical record, the clinical half ignores the image, the query path gets no gradient."""
    torch.manual_seed(0)
    net = _model("cpu", fusion="published").eval()
    fuse = net.cross_fusion
    img, clin = torch.randn(3, 16), torch.randn(3, 16)
    present = torch.ones(3, dtype=torch.bool)
    out = fuse(img, clin, present)
    out_clin = fuse(img, torch.randn(3, 16), present)
    out_img = fuse(torch.randn(3, 16), clin, present)
    torch.testing.assert_close(out_clin[:, :16], out[:, :16])
    torch.testing.assert_close(out_img[:, 16:], out[:, 16:])
    assert not torch.allclose(out_clin[:, 16:], out[:, 16:]) and not torch.allclose(out_img[:, :16], out[:, :16])
    # no clinical variable: both attentions output zero, the residuals stay
    none = fuse(img, clin, torch.zeros(3, dtype=torch.bool))
    i = torch.relu(fuse.image_in(img))
    torch.testing.assert_close(none[:, :16], fuse.image_out(i))


VARIANTS = [{}, {"fusion": "published"}, {"t1_only": True}, {"use_clinical": False}]


@pytest.mark.parametrize("variant", VARIANTS)
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


def test_probability_is_at_least_float32_and_keeps_float64(device):
    net, batch = _model(device).double().eval(), _batch(2, device)
    batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}
    pred = net.predict(batch)
    assert pred["logits"].dtype == pred["probability"].dtype == torch.float64
    torch.testing.assert_close(pred["probability"], torch.softmax(pred["logits"], -1)[:, 1], rtol=0, atol=0)
    half = _model(device).to(torch.bfloat16).eval()
    low = {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in _batch(2, device).items()}
    assert half.predict(low)["probability"].dtype == torch.float32


# the published fusion attends over one key per patient: its query path cannot get a gradient
DEAD_QUERY_PATH = ("cross_fusion.image_query.", "cross_fusion.clinical_query.", "cross_fusion.clinical_to_image.q_proj.",
                   "cross_fusion.image_to_clinical.q_proj.")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(device, variant):
    net = _model(device, **variant).train()
    batch = _batch(4, device)
    loss, _ = net.loss(batch, "train")
    loss.backward()
    dead = [n for n in dict(net.named_parameters()) if n.startswith(DEAD_QUERY_PATH)]
    assert len(dead) == (8 if variant.get("fusion") == "published" else 0)
    for n in dead:
        p = dict(net.named_parameters())[n]
        assert p.grad is None or p.grad.abs().max() <= 1e-6 * max(q.grad.abs().max() for q in net.parameters()
                                                                   if q.grad is not None), n
    missing = [n for n, p in net.named_parameters()
               if n not in dead and (p.grad is None or not torch.any(p.grad != 0))]
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


@pytest.mark.parametrize("fusion", ["tokens", "published"])
def test_prediction_independent_of_batch_mates(device, fusion):
    """The published defect (attention across the patients of a batch) is fixed, in both fusions."""
    net = _model(device, fusion=fusion).eval()
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


@pytest.mark.parametrize("fusion", ["tokens", "published"])
def test_missing_clinical_and_missing_t0(device, fusion):
    net = _model(device, fusion=fusion).eval()
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
    with pytest.raises(ValueError, match="fusion"):
        CSFNetConfig(fusion="late")
    with pytest.raises(ValueError, match="stage_conv_widths"):
        CSFNetConfig(stage_conv_widths=(8, 8))
    with pytest.raises(ValueError, match="stages"):
        CSFNetConfig(stages=((64,), ()))
    with pytest.raises(ValueError, match="not both"):
        CSFNetConfig(stages=((8,),), stage_widths=(8,), stage_blocks=(1,))


def test_stage_shorthand_and_opener_widths():
    """``stage_widths``/``stage_blocks`` (one width per stage) normalise into ``stages``; an explicit
    ``stage_conv_widths`` lets a small configuration widen at the stride-2 conv."""
    cfg = CSFNetConfig(stage_widths=(8, 16), stage_blocks=(2, 1), stage_conv_widths=(8, 16))
    assert cfg.stages == ((8, 8), (16,)) and cfg.stage_widths is None and cfg.stage_blocks is None
    assert CSFNetConfig(**dataclasses.asdict(cfg)) == cfg
    enc = CSFNet(dataclasses.replace(cfg, clinical_cardinalities=(2,))).encoder
    assert [s[0][0].out_channels for s in enc.stages] == [8, 16]
    assert CSFNetConfig(stages=((8,), (16,))).stage_conv_widths is None


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
