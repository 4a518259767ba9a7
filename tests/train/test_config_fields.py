"""Config fields the run cannot use are usage errors naming the field and the file, before any image
is read: a typo or bad value inside ``data.preprocess``, ``model_overrides`` the network refuses,
``stage_epochs`` naming a stage the model lacks (a file, a dict or a fit() keyword alike); and
``--epochs`` (a flag) beats ``stage_epochs`` (the file), on a fresh run and on ``--resume``."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import tiny_config
from lungcore.cli import main
from lungcore.train import fit
from lungcore.train.config import ConfigError, TrainConfig

CMML_TINY = dict(patch_size=[2, 4, 4], embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                 decoder_heads=2, clinical_dim=16, clinical_depth=1, clinical_heads=2, clinical_decoder_depth=1,
                 fusion_heads=2, img_size=[4, 8, 8])


@pytest.fixture
def no_image_read(monkeypatch):
    import lungcore.train.preflight as preflight

    def refuse(*args, **kwargs):
        raise AssertionError("an image was read before the usage error")
    monkeypatch.setattr(preflight, "read_every_image", refuse)


def train(capsys, config, out, *flags) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", "--config", str(config), "--out", str(out), "--no-progress", *map(str, flags)])
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, text: str, code: int = 2) -> None:
    assert rc == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lungcore train: error: {text}"), err


# --------------------------------------------------------------------------------------------------
# 1. data.preprocess and model_overrides


@pytest.mark.parametrize("preprocess, message", [
    ({"spacng": [1, 1, 1]}, "data.preprocess: unknown keys ['spacng']; known: ['canonical', 'crop', 'fill', "
                            "'order', 'spacing', 'window']"),
    ({"crop": [0, 16, 16]}, "data.preprocess.crop must be 3 positive integers (D, H, W), got (0, 16, 16)"),
    ({"spacing": [1, -1, 1]}, "data.preprocess.spacing must be 3 positive numbers"),
    ({"order": 2}, "data.preprocess.order must be 0 (nearest), 1 (trilinear) or 3"),
    ({"fill": "air"}, "data.preprocess.fill is invalid"),
])
def test_data_preprocess_is_checked_like_data_and_optim(tmp_path, preprocess, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "cmml", "data": {"preprocess": preprocess}}))
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_yaml(path)
    assert str(caught.value).startswith(f"config file {path}: {message}"), caught.value
    if isinstance(caught.value, ConfigError):  # the bad value, not the typo
        assert caught.value.field == message.split()[0]


def test_preprocess_typo_in_the_cli_is_one_line_exit_2(tmp_path, capsys, survival_cohort, no_image_read):
    config = tmp_path / "pptypo.yaml"
    config.write_text("model: cmml\ndata:\n  preprocess:\n    spacng: [1,1,1]\n")
    rc, err = train(capsys, config, tmp_path / "run", "--manifest", survival_cohort, "--epochs", "1")
    one_line(rc, err, f"config file {config}: data.preprocess: unknown keys ['spacng']")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"embed_dim": 30, "num_heads": 4}, "model_overrides do not make a valid cmml network: dim (30) must be "
                                        "divisible by num_heads (4)"),
    ({"embd_dim": 32}, "model_overrides: unknown keys ['embd_dim']; known: ["),
    ({"img_size": [4, 8, 16]}, "model_overrides.img_size = (4, 8, 16) contradicts data.preprocess.crop"),
])
def test_model_overrides_errors_name_the_field_and_the_file(tmp_path, capsys, survival_cohort, cache_dir,
                                                           no_image_read, overrides, message):
    cfg = tiny_config("cmml", survival_cohort, cache_dir, epochs=1, model_overrides={**CMML_TINY, **overrides})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rc, err = train(capsys, config, tmp_path / "run")
    one_line(rc, err, f"config file {config}: {message}")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# 2. stage_epochs names stages the model has


@pytest.mark.parametrize("model, stage, stages", [
    ("cmml", "prtrain", "['pretrain', 'finetune']"),
    ("csfnet", "pretrain", "['train']"),
    ("toy_survival", "train", "['pretrain', 'finetune']"),
])
def test_stage_epochs_of_an_unknown_stage_is_an_error(tmp_path, model, stage, stages):
    path = tmp_path / "se.yaml"
    path.write_text(yaml.safe_dump({"model": model, "stage_epochs": {stage: 2}}))
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_yaml(path)
    assert str(caught.value) == f"config file {path}: stage_epochs.{stage} is not a stage of {model!r}; its stages: {stages}"
    assert TrainConfig.from_dict({"model": model, "stage_epochs": {stages[2:].split("'")[0]: 2}})  # a real one


CMML_STAGES = "stage_epochs.train is not a stage of 'cmml'; its stages: ['pretrain', 'finetune']"


def test_stage_epochs_is_one_rule_for_a_dict_a_config_and_fit_keywords(tmp_path, survival_cohort, cache_dir,
                                                                      no_image_read):
    """A name that is no stage of the model is an error however the config is given, also another
    model's stage (the mapping the demo used to give both networks)."""
    with pytest.raises(ConfigError, match=r"^stage_epochs.prtrain is not a stage of 'cmml'; its stages: "):
        TrainConfig.from_dict({"model": "cmml", "stage_epochs": {"prtrain": 2}})
    shared = {"pretrain": 1, "finetune": 2, "train": 2}
    for make in (lambda: TrainConfig(model="cmml", stage_epochs=shared),
                 lambda: TrainConfig.from_dict({"model": "cmml", "stage_epochs": shared})):
        with pytest.raises(ConfigError) as caught:
            make()
        assert str(caught.value) == CMML_STAGES and caught.value.field == "stage_epochs.train"
    assert TrainConfig(model="cmml", stage_epochs={"pretrain": 1, "finetune": 2}).epochs_for("finetune") == 2
    # fit(): in the config dict, as its keyword, and a config written for the --model that runs
    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1)
    with pytest.raises(ConfigError, match=r"^stage_epochs.train is not a stage of 'toy_survival'; its stages: "
                                          r"\['pretrain', 'finetune'\]$"):
        fit({**cfg, "stage_epochs": {"train": 2}}, out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^stage_epochs.prtrain is not a stage of 'toy_survival'"):
        fit(cfg, out=tmp_path / "b", stage_epochs={"prtrain": 2})
    with pytest.raises(ConfigError, match=r"^stage_epochs.pretrain is not a stage of 'toy_classifier'; its "
                                          r"stages: \['train'\]$"):
        fit({**cfg, "stage_epochs": {"pretrain": 2}}, out=tmp_path / "c", model="toy_classifier")
    assert not any((tmp_path / name).exists() for name in "abc")
    from lungcore.train.loop import _resolve_config

    no_model = {k: v for k, v in cfg.items() if k != "model"}
    resolved = _resolve_config({**no_model, "stage_epochs": {"train": 3}}, {"model": "toy_classifier"})
    assert (resolved.model, resolved.epochs_for("train")) == ("toy_classifier", 3)
    path = tmp_path / "no_model.yaml"
    path.write_text(yaml.safe_dump({**no_model, "stage_epochs": {"train": 3}}))
    assert _resolve_config(path, {"model": "toy_classifier"}).epochs_for("train") == 3
    with pytest.raises(ValueError, match=rf"^config file {path}: stage_epochs.train is not a stage of 'cmml'"):
        _resolve_config(path, {})  # without --model it is a CMML config
    # --epochs / fit(epochs=) replaces stage_epochs, yet a name the model lacks stays an error (a typo
    # in the file would bite on the next run without the flag)
    with pytest.raises(ValueError, match=rf"^config file {path}: stage_epochs.train is not a stage of 'cmml'"):
        _resolve_config(path, {"epochs": 2})
    assert _resolve_config(path, {"epochs": 2, "model": "toy_classifier"}).stage_epochs == {}


def test_the_demo_gives_each_network_its_own_stages():
    from lungcore.train.demo import plan, stage_epochs

    for quick in (True, False):
        epochs = plan(quick)["epochs"]
        cmml, csfnet = stage_epochs("cmml", epochs), stage_epochs("csfnet", epochs)
        assert set(cmml) == {"pretrain", "finetune"} and set(csfnet) == {"train"}
        assert {**cmml, **csfnet} == epochs
        TrainConfig(model="cmml", stage_epochs=cmml)
        TrainConfig(model="csfnet", stage_epochs=csfnet)


def test_a_run_saved_with_other_models_stages_still_resumes(tmp_path, survival_cohort, cache_dir):
    """A run started before the rule (the demo's CMML run saved CSF-Net's 'train' too; a dict was
    not checked per model) resumes: those entries never counted (epochs_for reads the model's own
    stages) and are dropped from the config it resumes with. Passing such a mapping again is an
    error, as on a fresh run."""
    import warnings

    from lungcore.train.resume import resume_config

    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1, stage_epochs={"pretrain": 2})
    out = tmp_path / "run"
    fit(cfg, out=out)
    # as an old run saved it: another model's stage and an old typo, killed after the first pretrain epoch
    payload = torch.load(out / "last.pt", weights_only=True)
    payload["extra"]["train_config"]["stage_epochs"] = {"pretrain": 2, "train": 5, "prtrain": 9}
    payload["extra"]["trainer"].update(finished=False, stage_index=0, epoch=1, done=False)
    torch.save(payload, out / "last.pt")
    resumed, _ = resume_config(out, None, {})
    assert resumed.stage_epochs == {"pretrain": 2}
    assert (resumed.epochs_for("pretrain"), resumed.epochs_for("finetune")) == (2, 1)
    same, _ = resume_config(out, cfg, {})  # the config the run was started with agrees with it
    assert same == resumed
    with pytest.raises(ConfigError, match=r"^stage_epochs.train is not a stage of 'toy_survival'"):
        resume_config(out, {**cfg, "stage_epochs": {"pretrain": 2, "train": 5}}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(None, out=out, resume=True)  # and it runs to the end: pretrain's 2nd epoch, finetune
    assert [(h["stage"], h["epoch"]) for h in fit_history(out)][-2:] == [("pretrain", 2), ("finetune", 1)]
    assert result.best_checkpoint.is_file()
    saved = torch.load(out / "last.pt", weights_only=True)["extra"]["train_config"]
    assert saved["stage_epochs"] == {"pretrain": 2}


def test_stage_epochs_typo_in_the_cli(tmp_path, capsys, survival_cohort, cache_dir, no_image_read):
    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1, stage_epochs={"prtrain": 2})
    config = tmp_path / "se.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rc, err = train(capsys, config, tmp_path / "run", "--epochs", "1")
    one_line(rc, err, f"config file {config}: stage_epochs.prtrain is not a stage of 'toy_survival'; "
                      "its stages: ['pretrain', 'finetune']")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# 3. --epochs (a flag) beats stage_epochs (the file); --resume keeps its rules


def test_epochs_flag_replaces_the_config_stage_epochs(tmp_path, capsys, survival_cohort, cache_dir):
    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=3, stage_epochs={"pretrain": 2})
    config = tmp_path / "se2.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    rc, err = train(capsys, config, out, "--epochs", "1")
    assert rc == 0, err
    assert [h["stage"] for h in fit_history(out)] == ["pretrain", "finetune"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["stage_epochs"] == {}
    # resuming with the same command line: the file's stage_epochs is overridden again, not a contradiction
    payload = torch.load(out / "last.pt", weights_only=True)
    payload["extra"]["trainer"]["finished"] = False
    payload["extra"]["trainer"]["epoch"] = 0
    torch.save(payload, out / "last.pt")
    from lungcore.train.resume import resume_config

    resumed, _ = resume_config(out, config, {"epochs": 1})
    assert resumed.epochs_for("pretrain") == resumed.epochs_for("finetune") == 1


def fit_history(out):
    import pandas as pd

    return pd.read_csv(out / "metrics.csv").to_dict("records")


def test_resume_epochs_must_not_shorten_stage_epochs_and_replaces_them(tmp_path, survival_cohort, cache_dir):
    from lungcore.train.resume import resume_config
    from lungcore.usage import UsageError

    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1, stage_epochs={"pretrain": 2})
    out = tmp_path / "run"
    fit(cfg, out=out)  # no flag: the config's stage_epochs hold
    assert [h["stage"] for h in fit_history(out)] == ["pretrain", "pretrain", "finetune"]
    # as if killed after the first pretrain epoch
    payload = torch.load(out / "last.pt", weights_only=True)
    payload["extra"]["trainer"].update(finished=False, stage_index=0, epoch=1, done=False)
    torch.save(payload, out / "last.pt")
    with pytest.raises(UsageError, match=r"epochs 1 \(the run was started with stage_epochs.pretrain 2\)"):
        resume_config(out, None, {"epochs": 1})           # would cut pretrain short
    same, _ = resume_config(out, None, {})                # no flag: the saved config
    assert (same.epochs_for("pretrain"), same.epochs_for("finetune")) == (2, 1)
    longer, _ = resume_config(out, None, {"epochs": 3})   # every stage still to train runs 3 epochs
    assert (longer.epochs_for("pretrain"), longer.epochs_for("finetune"), longer.stage_epochs) == (3, 3, {})
    # in finetune, pretrain's count is done and stays on record; --epochs 1 does not shorten finetune (1)
    payload["extra"]["trainer"].update(stage_index=1, epoch=0)
    torch.save(payload, out / "last.pt")
    cfg2, _ = resume_config(out, None, {"epochs": 1})
    assert (cfg2.stage_epochs, cfg2.epochs_for("finetune")) == ({"pretrain": 2}, 1)


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ({"accumulate": 0}, "accumulate must be an integer >= 1, got 0"),
])
def test_fit_names_the_keyword_the_caller_wrote(tmp_path, capsys, survival_cohort, cache_dir, override, message):
    """A bad value given to fit() is named by its keyword (as evaluate/predict do); the same value
    given on the command line is named by its flag; one from the config file by its field."""
    from lungcore.usage import UsageError

    cfg = tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1)
    with pytest.raises(UsageError, match=f"^{message}"):
        fit(cfg, out=tmp_path / "run", **override)
    assert not (tmp_path / "run").exists()
    (key, value), = override.items()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["train", "--config", str(config), "--out", str(tmp_path / "run"), f"--{key.replace('_', '-')}",
               str(value), "--no-progress"])
    assert rc == 2 and capsys.readouterr().err.startswith(f"lungcore train: error: --{key.replace('_', '-')} "), rc


def test_resume_checks_a_config_without_model_as_one_for_the_runs_model(tmp_path, nodule_cohort, cache_dir):
    """A config naming no model, given on resume (as on the run's start with --model), is checked
    against the run's model: its stage_epochs may name that model's stages, and only those."""
    from lungcore.train.resume import resume_config

    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1, stage_epochs={"train": 2})
    no_model = {k: v for k, v in cfg.items() if k != "model"}
    out = tmp_path / "run"
    fit(no_model, out=out, model="toy_classifier")
    payload = torch.load(out / "last.pt", weights_only=True)
    payload["extra"]["trainer"].update(finished=False, stage_index=0, epoch=1, done=False)
    torch.save(payload, out / "last.pt")
    resumed, _ = resume_config(out, no_model, {})
    assert (resumed.model, resumed.epochs_for("train")) == ("toy_classifier", 2)
    path = tmp_path / "no_model.yaml"
    path.write_text(yaml.safe_dump(no_model))
    assert resume_config(out, path, {})[0] == resumed
    with pytest.raises(ConfigError, match=r"^stage_epochs.pretrain is not a stage of 'toy_classifier'"):
        resume_config(out, {**no_model, "stage_epochs": {"train": 2, "pretrain": 1}}, {})
