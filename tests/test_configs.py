"""The command line checked against the configs (crate_lit.configs), the Trainer and debug groups."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, List

import lightning as L
import pytest
import torch
import yaml

from commands import REPO, crate_train, metric_rows, one_line_error, run_command, summary_of
from crate_lit.configs import CommandLineError, check_command_line, group_options, usage

CONF = REPO / "conf"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trainer.max_epoch=1"], "unknown key trainer.max_epoch (not in the composed config); did you mean"),
        (["model.lr=1e-3"], "did you mean optimizer.lr?"),  # the right name under another group
        (["trainer.batch_size=8"], "did you mean data.batch_size?"),
        (["model=crate_tiyn"], "unknown model=crate_tiyn; did you mean model=crate_tiny?"),
        (["model=_crate"], "model=_crate is a base that the model configs build on, not an option"),
        (["-m", "model=crate_tiny,crate_tiyn"], "did you mean model=crate_tiny?"),  # each value of a sweep
        (["debug=fdrr"], "unknown debug=fdrr; did you mean debug=fdr?"),
        (["experiment=cifar_finetune", "data.rooot=/x"], "did you mean data.root?"),  # the groups chosen
        (["ckpt_path=/données/last.ckpt"], "unquoted; quote its value: ckpt_path='/données/last.ckpt'"),
    ],
)  # fmt: skip
def test_mistakes_on_the_command_line_are_named_with_the_closest_valid_one(argv, expected) -> None:
    with pytest.raises(CommandLineError) as err:
        check_command_line("train", argv)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["trainer.fast_dev_run=true", "trainer.overfit_batches=2"],  # every Trainer argument, no +
        ["+new_key=1", "++trainer.max_epochs=3", "~logger"],
        ["-m", "optimizer=lion,adamw", "optimizer.lr=1e-4,2e-4", "--cfg", "job"],
        ["data=imagenet", "data.root=/data/imagenet", "paths.output_dir=/x"],
        ["data.shape_scale=[0.3,0.6]", "data.shape_scale.0=0.2"],
        ["experiment=mae_pretrain", "mask_ratio=0.5", "optimizer.lr=interval(1e-4,1e-2)"],
        ["hydra/launcher=slurm", "hydra.run.dir=/x", "ckpt_path='/my runs/données.ckpt'"],
        ["debug=overfit", "scheduler.warmup_epochs=0.5"],  # keys a group's own defaults bring in
        ["--config-dir", "/elsewhere", "anything.at_all=1"],  # other configs: not ours to judge
    ],
)
def test_valid_command_lines_pass(argv) -> None:
    check_command_line("train", argv)


def test_analyze_command_lines_are_checked_against_its_own_config() -> None:
    check_command_line("analyze", ["ckpt_path=x.ckpt", "model=crate_small", "knn_k=5"])
    with pytest.raises(CommandLineError, match="did you mean knn_k?"):
        check_command_line("analyze", ["ckpt_path=x.ckpt", "knn_kk=5"])


def test_help_lists_groups_and_options_without_the_bases() -> None:
    text = usage("crate-train", "train", "Train.", ["crate-train debug=fdr"])
    groups = {
        line.split()[0] for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")
    }
    assert {"model", "data", "optimizer", "trainer", "debug", "experiment"} <= groups
    assert " _crate" not in text and "crate_mini*" in text and "shapes*" in text
    assert "fdr, limit, overfit, profiler" in text and "  crate-train debug=fdr" in text
    assert group_options("model") == sorted(p.stem for p in (CONF / "model").glob("[!_]*.yaml"))


def test_the_trainer_config_holds_every_trainer_argument_with_lightnings_defaults() -> None:
    shipped = yaml.safe_load((CONF / "trainer" / "default.yaml").read_text())
    signature = inspect.signature(L.Trainer.__init__).parameters
    passed_by_crate_lit = {"self", "callbacks", "logger", "plugins", "default_root_dir"}
    assert set(shipped) == set(signature) - passed_by_crate_lit
    chosen = {
        "max_epochs",
        "devices",
        "log_every_n_steps",
        "deterministic",
        "enable_progress_bar",
        "precision",
    }
    differ = {k for k, v in shipped.items() if v != signature[k].default}
    assert differ == chosen  # what the yaml's header says differs from Lightning


def test_crate_train_help_is_the_crate_lit_page(tmp_path: Path) -> None:
    proc = crate_train("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: crate-train") and "examples:" in proc.stdout
    assert "_crate_mae" not in proc.stdout and not (tmp_path / "outputs").exists()


# the debug configs set the epochs and batch counts themselves
TINY = [
    "model=crate_micro",
    "data.image_size=32",
    "data.train_size=128",
    "data.val_size=32",
    "data.batch_size=16",
]
TINY += ["data.cache_dir=null", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("debug, steps, epochs", [("fdr", 1, 1), ("limit", 10, 2)])
def test_debug_group_runs(tmp_path: Path, debug: str, steps: int, epochs: int) -> None:
    proc = crate_train(*TINY, f"debug={debug}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "outputs").glob("*/*"))
    summary = summary_of(run)
    assert (summary["global_step"], summary["epochs"]) == (steps, epochs)
    saved = sorted(p.name for p in run.glob("checkpoints/*.ckpt"))
    if debug == "fdr":  # fast_dev_run writes no checkpoint
        assert saved == []
    else:
        assert len(saved) == 2 and saved[0].startswith("best-epoch00") and saved[1] == "last.ckpt"


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_down(tmp_path: Path) -> None:
    proc = crate_train(*TINY, "debug=overfit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "outputs").glob("*/*"))
    losses = [float(r["train/loss"]) for r in metric_rows(run) if r.get("train/loss")]
    assert summary_of(run)["global_step"] == 80  # 2 batches x 40 epochs
    assert losses[-1] < 0.5 * losses[0], losses


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without a GPU")
def test_16_bit_precision_on_the_cpu_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from crate_lit.validation import validate

    for precision, warned in (("bf16-mixed", True), ("16-mixed", True), ("32-true", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crate_lit.train"):
            validate(_composed(f"trainer.precision={precision}"))
        assert ("runs several times slower than trainer.precision=32-true" in caplog.text) == warned


def test_crate_analyze_and_crate_bench_check_their_command_lines(tmp_path: Path) -> None:
    proc = run_command("crate-analyze", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: crate-analyze"), proc.stderr[-2000:]
    proc = run_command("crate-analyze", "ckpt_path=x.ckpt", "knn_kk=5", cwd=tmp_path)
    assert "did you mean knn_k?" in one_line_error(proc, command="crate-analyze")
    proc = run_command("crate-bench", "--data", "data.batch_sise=8", cwd=tmp_path)
    assert "did you mean data.batch_size?" in one_line_error(proc, command="crate-bench")


@pytest.mark.parametrize("ratio", ["1.5", "1.0", "-0.1", "half"])
def test_a_mask_ratio_outside_0_to_1_stops_before_anything_is_built(ratio: str) -> None:
    from crate_lit.validation import ConfigError, validate

    cfg = _composed("task=mae", "model=mae_crate_micro", "data.image_size=32", f"mask_ratio={ratio}")
    with pytest.raises(ConfigError, match=r"mask_ratio must be a number in \[0, 1\)"):
        validate(cfg)
    validate(_composed("task=mae", "model=mae_crate_micro", "data.image_size=32", "mask_ratio=0.0"))


def test_every_model_config_builds_the_architecture_of_its_size_table_entry() -> None:
    """The sizes are written in the models' tables (CRATE_CONFIGS, CRATE_ALPHA_CONFIGS,
    CRATE_MAE_CONFIGS) and in one yaml per model: the two must name the same models and the same
    architecture, and the shared yaml's defaults (global_pool, norm_pix_loss, ...) must be the
    constructors' own."""
    from crate_lit.models.factory import FAMILIES, MODEL_NAMES, family, named_config

    from_data = {"img_size", "num_classes"}  # the data config's, not the model's
    names = sorted(group_options("model"))
    assert names == sorted(MODEL_NAMES)
    for name in names:
        model = dict(_composed(f"model={name}").model)
        assert model.pop("name") == name
        assert model.pop("pretrained") is None
        expected = named_config(name)
        for key, value in model.items():
            if key not in from_data:
                assert key in expected, f"conf/model/{name}.yaml: {key} is no argument of the model"
                assert value == expected[key], (
                    f"conf/model/{name}.yaml: {key}={value}, the table: {expected[key]}"
                )
        for key, value in FAMILIES[family(name)][0][name].items():
            if key not in from_data:
                assert model.get(key) == value, f"conf/model/{name}.yaml lacks {key}={value} of the table"


# constructor defaults that stand for a yaml value rather than repeat it
_DEFAULTS_NOT_REPEATING_THE_CONFIG = {
    ("cifar10", "num_classes"): "None: the variant's class count (10 for cifar10, 100 for variant=cifar100)",
}


def _data_config(name: str) -> tuple[dict, set]:
    """conf/data/<name>.yaml with the configs its defaults list builds on merged in (the file's
    own keys last, as Hydra places _self_), and the keys the file sets over them."""
    own = yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())
    merged: dict = {}
    for base in own.pop("defaults", []):
        merged |= _data_config(base)[0]
    return merged | own, set(own) if merged else set()


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_the_data_modules_defaults_are_the_shipped_configs(name: str) -> None:
    """Python defaults equal conf/data/<name>.yaml, for every key that is a constructor argument
    (interpolated values such as ${paths.data_dir} excepted). A config built on another (cifar100
    on cifar10) differs from it in the keys it sets itself: those are the variant, not defaults."""
    from crate_lit.data import DATAMODULES

    cfg, variant_keys = _data_config(name)
    parameters = inspect.signature(DATAMODULES[cfg["name"]]).parameters
    checked, differ = [], []
    for key, value in cfg.items():
        param = parameters.get(key)
        if param is None or param.default is param.empty or key in variant_keys:
            continue
        if (isinstance(value, str) and "${" in value) or (name, key) in _DEFAULTS_NOT_REPEATING_THE_CONFIG:
            continue
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        checked.append(key)
        if default != value:
            differ.append(f"{key}: {param.default!r} in Python, {value!r} in the yaml")
    assert not differ, f"{DATAMODULES[cfg['name']].__name__} against conf/data/{name}.yaml: {differ}"
    assert checked  # the config was read


def test_ema_decay_drives_the_ema_entry_of_the_callbacks_group(tmp_path: Path) -> None:
    """ema_decay=null: no EMA callback, the others as they are; ema_decay=0.9: one more, the EMA."""
    from crate_lit.building import instantiate_group
    from crate_lit.callbacks import EMA

    def callbacks(*overrides: str) -> list:
        return instantiate_group(_composed(f"paths.output_dir={tmp_path}", *overrides).callbacks)

    off, on = callbacks(), callbacks("ema_decay=0.9")
    assert not [c for c in off if isinstance(c, EMA)]
    (ema,) = [c for c in on if isinstance(c, EMA)]
    # after the callbacks that were there before, where crate-train used to add it; before the
    # MAE figure, which draws the trained weights (as when the module drew it)
    names = [type(c).__name__ for c in on]
    assert ema.decay == 0.9 and names[-2:] == ["EMA", "ReconstructionFigures"], names
    assert [type(c) for c in on if c is not ema] == [type(c) for c in off]


# crate-train's config composed from conf/ as it was before the tree was reorganised (e41d098),
# for 48 command lines: the defaults, every experiment, every option of every group then
COMPOSED_BEFORE = yaml.safe_load((REPO / "tests" / "composed_configs.yaml").read_text())


def _changed(before: Any, now: Any, path: str = "") -> List[str]:
    """Where ``now`` differs from ``before``: a key missing or a value changed; keys that came
    later (new options, with defaults that keep the old behaviour) are allowed."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [
            change
            for key, value in before.items()
            for change in (
                _changed(value, now[key], f"{path}.{key}") if key in now else [f"{path}.{key} is gone"]
            )
        ]
    return [] if before == now else [f"{path}: {before!r} then, {now!r} now"]


@pytest.mark.parametrize("case", list(COMPOSED_BEFORE))
def test_configs_compose_as_they_did_before_the_tree_was_reorganised(case: str) -> None:
    from omegaconf import OmegaConf

    overrides = [] if case == "(defaults)" else case.split(" ")
    now = OmegaConf.to_container(_composed(*overrides), resolve=False)
    # as structures: the yaml text of a config depends on the omegaconf version
    assert not _changed(yaml.safe_load(COMPOSED_BEFORE[case]), now)
