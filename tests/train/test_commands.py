"""``lungcore train | evaluate | predict | demo`` (lungcore/train/commands.py): bad flags are one-line
usage errors naming the flag (exit 2), found before any work (no run folder, no image read);
help texts say what the code does; evaluate --overwrite replaces its report; predict's CSV
echoes the manifest's times."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_config
from lungcore.cli import build_parser, main
from lungcore.train import fit


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(rc: int, err: str, command: str, text: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lungcore {command}: error: {text}"), err


@pytest.fixture
def no_image_read(monkeypatch):
    """Fail the test if any CT is read (the check must come before)."""
    import lungcore.train.preflight as preflight

    def refuse(*args, **kwargs):
        raise AssertionError("an image was read before the usage error")
    monkeypatch.setattr(preflight, "read_every_image", refuse)


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory, survival_cohort, cache_dir):
    out = tmp_path_factory.mktemp("commands") / "run"
    fit(tiny_config("toy_survival", survival_cohort, cache_dir, epochs=1), out=out)
    return out


def _config(tmp_path, manifest, cache_dir, **data) -> object:
    cfg = tiny_config("toy_classifier", manifest, cache_dir, epochs=1)
    cfg["data"].update(data)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------------------------------
# train: the flag is named, before any work


@pytest.mark.parametrize("flag, value, message", [
    ("--patience", "-1", "--patience must be an integer >= 0, got -1"),
    ("--num-workers", "-1", "--num-workers must be an integer >= 0, got -1"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--accumulate", "0", "--accumulate must be an integer >= 1, got 0"),
    ("--lr", "0", "--lr must be a number > 0, got 0.0"),
    ("--lr", "nan", "--lr must be a number > 0, got nan"),
    ("--stage", "nope", "--stage 'nope' is not a stage of"),
])
def test_train_names_the_bad_flag_before_any_work(tmp_path, capsys, nodule_cohort, cache_dir, no_image_read,
                                                  flag, value, message):
    config = _config(tmp_path, nodule_cohort, cache_dir)
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--config", config, "--out", out, flag, value, "--no-progress")
    usage_error(rc, err, "train", message)
    assert not out.exists()


def test_train_names_the_config_field_when_the_file_gave_it(tmp_path, capsys, nodule_cohort, cache_dir,
                                                            no_image_read):
    config = _config(tmp_path, nodule_cohort, cache_dir, num_workers=-1)
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--config", config, "--out", out, "--no-progress")
    usage_error(rc, err, "train", f"config file {config}: data.num_workers must be an integer >= 0, got -1")
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("augment", "off"), ("augment", 1)])
def test_a_boolean_that_is_not_one_is_named(tmp_path, capsys, nodule_cohort, cache_dir, no_image_read, field, value):
    """``augment: "off"`` (quoted) is a truthy string: refused by name, not taken as on."""
    config = _config(tmp_path, nodule_cohort, cache_dir, **{field: value})
    rc, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "run", "--no-progress")
    usage_error(rc, err, "train", f"config file {config}: data.{field} must be true or false, got {value!r}")
    from lungcore.train.config import ConfigError, TrainConfig
    from lungcore.usage import UsageError

    for bad in ({"progress": "no"}, {"deterministic": 0}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} must be true or false"):
            TrainConfig.from_dict(bad)
    with pytest.raises(UsageError, match="augment must be true or false, got 'yes'"):
        fit(tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1), out=tmp_path / "api", augment="yes")
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()


def test_no_augment_flag_reaches_the_run_and_resume_holds_it(tmp_path, capsys, nodule_cohort, cache_dir):
    """``--no-augment`` turns the config's augmentation off (saved in the run's config.yaml); a
    resume that contradicts it is refused by name, as for any flag that changes what is learnt."""
    config = _config(tmp_path, nodule_cohort, cache_dir, augment=True)
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--config", config, "--out", out, "--no-augment", "--no-progress")
    assert rc == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["augment"] is False
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--augment", "--epochs", "2", "--no-progress")
    assert rc == 2 and "--augment" in err and "Traceback" not in err, err


def test_patience_zero_never_stops_early(tmp_path, nodule_cohort, cache_dir):
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=3, patience=0, monitor="val_loss",
                      optim={"lr": 1e-12, "warmup_epochs": 0})
    assert len(fit(cfg, out=tmp_path / "run").history) == 3


# --------------------------------------------------------------------------------------------------
# demo, predict, evaluate


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "-1", "--threads must be an integer >= 0 (0: torch's choice), got -1"),
    ("--seed", "-1", "--seed must be an integer >= 0, got -1"),
])
def test_demo_checks_its_numbers_first(tmp_path, capsys, flag, value, message):
    threads = torch.get_num_threads()
    rc, _, err = run(capsys, "demo", "--out", tmp_path / "demo", "--quick", flag, value)
    usage_error(rc, err, "demo", message)
    assert not (tmp_path / "demo").exists() and torch.get_num_threads() == threads


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_batch_size_is_checked_before_any_image_is_read(tmp_path, capsys, survival_run, survival_cohort,
                                                        no_image_read, command):
    out = tmp_path / "out"
    rc, _, err = run(capsys, command, "--checkpoint", survival_run / "best.pt", "--manifest", survival_cohort,
                     "--out", out, "--batch-size", "0")
    usage_error(rc, err, command, "--batch-size must be an integer >= 1, got 0")
    assert not out.exists()


def test_evaluate_without_endpoints_says_so_before_any_image_is_read(tmp_path, capsys, survival_run,
                                                                      survival_cohort, no_image_read):
    frame = pd.read_csv(survival_cohort, dtype=str, keep_default_na=False)
    manifest = survival_cohort.parent / "no_endpoints.csv"
    frame.drop(columns=["pfs_time", "pfs_event", "os_time", "os_event"]).to_csv(manifest, index=False)
    (survival_cohort.parent / "no_endpoints.schema.json").write_text(
        (survival_cohort.parent / "manifest.schema.json").read_text())
    rc, _, err = run(capsys, "evaluate", "--checkpoint", survival_run / "best.pt", "--manifest", manifest)
    usage_error(rc, err, "evaluate", f"manifest {manifest}: columns 'pfs_time'/'pfs_event' or 'os_time'/'os_event' "
                                     "are missing or empty")


def test_a_folder_or_a_garbage_file_as_checkpoint(tmp_path, capsys, survival_run, survival_cohort):
    rc, _, err = run(capsys, "predict", "--checkpoint", survival_run, "--manifest", survival_cohort,
                     "--out", tmp_path / "p.csv")
    usage_error(rc, err, "predict", f"checkpoint {survival_run} is a folder, not a checkpoint file; it holds "
                                    f"best.pt, last.pt")
    assert f"pass {survival_run / 'best.pt'}" in err
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"i am garbage")
    rc, _, err = run(capsys, "predict", "--checkpoint", garbage, "--manifest", survival_cohort,
                     "--out", tmp_path / "p.csv")
    usage_error(rc, err, "predict", f"checkpoint {garbage} is corrupt or not a lungcore checkpoint (not a file "
                                    "written by torch.save: it starts with neither a zip nor a pickle header)")


def test_evaluate_overwrite_replaces_the_report_and_keeps_other_files(tmp_path, capsys, survival_run,
                                                                      survival_cohort):
    report = tmp_path / "report"
    report.mkdir()
    (report / "roc.png").write_bytes(b"an old classification report's plot")
    (report / "summary.md").write_text("old")
    (report / "notes.txt").write_text("mine")
    rc, _, err = run(capsys, "evaluate", "--checkpoint", survival_run / "best.pt", "--manifest", survival_cohort,
                     "--out", report, "--overwrite", "--no-progress")
    assert rc == 0, err
    assert not (report / "roc.png").exists() and (report / "km_os.png").is_file()
    assert (report / "summary.md").read_text() != "old" and (report / "notes.txt").read_text() == "mine"


def test_predictions_echo_the_manifest_times_and_integer_events(tmp_path, capsys, survival_run, survival_cohort):
    out = tmp_path / "risks.csv"
    rc, _, err = run(capsys, "predict", "--checkpoint", survival_run / "best.pt", "--manifest", survival_cohort,
                     "--out", out, "--no-progress")
    assert rc == 0, err
    manifest = pd.read_csv(survival_cohort, dtype=str, keep_default_na=False).set_index("patient_id")
    for path in (out, survival_run / "predictions_test.csv"):
        written = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert len(written)
        for _, row in written.iterrows():
            given = manifest.loc[row["id"]]
            for e in ("pfs", "os"):
                assert row[f"{e}_event"] == given[f"{e}_event"], (path, row["id"])
                if given[f"{e}_time"]:
                    assert float(row[f"{e}_time"]) == float(given[f"{e}_time"]), (path, row["id"])
                    assert len(row[f"{e}_time"]) <= len(given[f"{e}_time"]) + 2  # 2.6291, not 2.6291000843...
                else:
                    assert row[f"{e}_time"] == ""


# --------------------------------------------------------------------------------------------------
# help texts


def _help(command: str, flag: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return action.help


def test_help_says_what_the_code_does():
    stage = _help("train", "--stage")
    assert "all" in stage and "both" not in stage and "pretrain" in stage
    assert "no report is written" in _help("evaluate", "--out")
    assert "any other file there stays" in _help("evaluate", "--overwrite")
    assert "0 = never" in _help("train", "--patience")
