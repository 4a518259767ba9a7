"""Per-parameter optimiser settings: CMML's T2G column embeddings at their own learning rate
(``graph_column_lr``, as T2G-Former's authors train them), through ``schedule.optimizer`` and ``fit``."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lungcore.models import create
from lungcore.train import TrainConfig, fit
from lungcore.train.schedule import optimizer

TINY = dict(patch_size=(2, 4, 4), embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
            decoder_heads=2, clinical_dim=16, clinical_depth=1, clinical_heads=2, clinical_decoder_depth=1,
            fusion_heads=2, img_size=(4, 8, 8))


def _columns(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("col_head", "col_tail")}


def test_column_embeddings_get_their_own_group():
    model = create("cmml", **TINY)
    assert len(_columns(model)) == 4  # encoder and graph decoder, head and tail
    cfg = TrainConfig.from_dict({"model": "cmml", "optim": {"lr": 1e-3, "weight_decay": 0.05}})
    opt = optimizer(model, cfg)
    assert len(opt.param_groups) == 3
    own = opt.param_groups[2]
    ids = {id(p) for p in own["params"]}
    assert ids == {id(p) for n, p in model.named_parameters() if n in _columns(model)}
    assert own["lr"] == pytest.approx(1e-2) and own["lr_scale"] == pytest.approx(10.0) and own["weight_decay"] == 0.0
    others = [id(p) for g in opt.param_groups[:2] for p in g["params"]]
    assert not ids & set(others) and len(others) + len(ids) == sum(1 for _ in model.parameters())
    # the dense graph has no column embeddings; None keeps one learning rate
    for overrides in ({"clinical_graph": "dense"}, {"graph_column_lr": None}):
        plain = create("cmml", **TINY, **overrides)
        assert plain.param_group_overrides() == {} and len(optimizer(plain, cfg).param_groups) == 2
    with pytest.raises(ValueError, match="graph_column_lr must be a positive number or None"):
        create("cmml", **TINY, graph_column_lr=0.0)


def test_fit_steps_the_columns_at_their_rate_on_the_schedule(tmp_path, survival_cohort, cache_dir, monkeypatch):
    seen: list[list[float]] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    cfg = tiny_config("cmml", survival_cohort, cache_dir, epochs=2, model_overrides={**TINY, "graph_column_lr": 0.05},
                      optim={"lr": 1e-3, "warmup_epochs": 0.5})
    fit(cfg, out=tmp_path / "run")
    assert len(seen) > 4 and all(len(lrs) == 3 for lrs in seen)
    for base, no_decay, columns in seen:
        assert no_decay == base and columns == pytest.approx(50 * base, rel=1e-12)
    bases = [lrs[0] for lrs in seen]
    assert len(set(bases)) > 2 and max(bases) == pytest.approx(1e-3)  # warm-up and cosine, both groups


def test_resume_across_the_group_change_names_the_way_out(tmp_path, survival_cohort, cache_dir, monkeypatch):
    """A run whose optimiser was saved with one learning rate for all (a lungcore before
    ``graph_column_lr``) is refused on resume with a message naming both ways out."""
    from lungcore.models.cmml import CMML

    out = tmp_path / "run"
    cfg = tiny_config("cmml", survival_cohort, cache_dir, epochs=1, stage="pretrain", model_overrides=TINY)
    with monkeypatch.context() as m:
        m.setattr(CMML, "param_group_overrides", lambda self: {})  # as the earlier lungcore built it
        fit(cfg, out=out)
    with pytest.raises(ValueError, match="optimiser state has 2 parameter groups, this model and lungcore make 3"):
        fit(out=out, resume=True, epochs=2)


def test_set_lr_keeps_each_groups_scale_and_the_experiment_scripts_use_it():
    """``schedule.set_lr`` moves every group along one schedule; experiments/cmml_common.py builds
    its optimiser through ``schedule.optimizer`` (the column group included) and steps ``stage_lr``."""
    import sys
    from pathlib import Path

    from lungcore.train.config import OptimConfig
    from lungcore.train.schedule import set_lr, stage_lr

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    try:
        import cmml_common
    finally:
        sys.path.pop(0)
    model = create("cmml", **TINY)
    opt, lr_at = cmml_common.optimiser(model, lr=1e-3, epochs=10, n_train=100, batch_size=32)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.0]
    assert opt.param_groups[2]["lr_scale"] == pytest.approx(10.0)
    want = stage_lr(OptimConfig(lr=1e-3, weight_decay=0.05, warmup_epochs=1.0), steps_per_epoch=4, epochs=10)
    for step in (0, 3, 4, 20, 39):
        set_lr(opt, lr_at(step))
        assert opt.param_groups[0]["lr"] == pytest.approx(want(step))
        assert opt.param_groups[2]["lr"] == pytest.approx(10 * want(step))
    assert lr_at(3) == pytest.approx(1e-3) and lr_at(39) < 2e-5      # warm-up over 1 epoch, cosine to 1 %
