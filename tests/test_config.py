"""Training configuration for jobs: recipes, config files, MOCOSTREAM_* environment variables, flags,
their precedence, unknown keys, and --print-config with secrets masked."""
from __future__ import annotations

import json

import pytest

from mocostream.ops.cli import main as cli_main
from mocostream.ops.config import ConfigError, build_config, env_values, mask_secrets


def test_recipes_fill_the_paper_defaults_and_every_value_can_be_overridden():
    v1 = build_config({}, {"data": "/d", "recipe": "moco_v1"}, environ={})
    assert (v1.temperature, v1.mlp, v1.lr_schedule) == (0.07, False, "step")
    v2 = build_config({}, {"data": "/d", "recipe": "moco_v2"}, environ={})
    assert (v2.temperature, v2.mlp, v2.lr_schedule) == (0.2, True, "cosine")
    for cfg in (v1, v2):  # shared by both papers
        assert (cfg.base_lr, cfg.sgd_momentum, cfg.weight_decay, cfg.moco_momentum) == (0.03, 0.9, 1e-4, 0.999)
    custom = build_config({}, {"data": "/d", "recipe": "moco_v2", "temperature": 0.5, "mlp": False,
                               "lr_schedule": "step", "moco_momentum_schedule": "cosine", "symmetric": True},
                          environ={})
    assert (custom.temperature, custom.mlp, custom.lr_schedule, custom.moco_momentum_schedule,
            custom.symmetric) == (0.5, False, "step", "cosine", True)


def test_a_preset_fills_its_settings_under_every_source_and_leaves_the_recipes_alone():
    from mocostream.ops.config import PRESETS

    cfg = build_config({}, {"data": "/d", "preset": "small_cpu"}, environ={})
    for key, value in PRESETS["small_cpu"].items():
        assert getattr(cfg, key) == value, key
    assert cfg.recipe == "moco_v2" and (cfg.sgd_momentum, cfg.symmetric) == (0.9, False)  # the rest: v2's own
    over = build_config({"image_size": 32}, {"data": "/d", "preset": "small_cpu", "temperature": 0.2},
                        environ={"MOCOSTREAM_QUEUE_SIZE": "1024"})
    assert (over.image_size, over.temperature, over.queue_size, over.base_lr) == (32, 0.2, 1024, 0.12)
    from_env = build_config({}, {"data": "/d"}, environ={"MOCOSTREAM_PRESET": "small_cpu"})
    assert from_env.bn_splits == 8 and from_env.arch == "resnet18_cifar_half"
    plain = build_config({}, {"data": "/d", "recipe": "moco_v2"}, environ={})  # no preset: v2 as the paper has it
    assert (plain.temperature, plain.base_lr, plain.moco_momentum, plain.queue_size) == (0.2, 0.03, 0.999, 65536)
    with pytest.raises(ConfigError, match="unknown --preset 'fast'; choose from small_cpu"):
        build_config({}, {"data": "/d", "preset": "fast"}, environ={})


def test_precedence_defaults_file_environment_flags():
    file_values = {"data": "/file", "steps": 7, "batch_size": 16, "symmetric": False}
    env = {"MOCOSTREAM_STEPS": "8", "MOCOSTREAM_SYMMETRIC": "true", "MOCOSTREAM_TEMPERATURE": "0.3",
           "MOCOSTREAM_KNN_DATA": "/eval", "AWS_REGION": "us-east-1"}
    cfg = build_config(file_values, {"steps": 9, "batch_size": None}, environ=env)
    assert cfg.data == "/file"  # file over default
    assert cfg.batch_size == 16  # file, no env, flag not given
    assert cfg.symmetric is True and cfg.temperature == 0.3 and cfg.knn_data == "/eval"  # env over file
    assert cfg.steps == 9  # flag over env
    assert cfg.queue_size == 65536  # default


@pytest.mark.parametrize("env,message", [
    ({"MOCOSTREAM_BATCHSIZE": "3"}, "unknown option in environment variable MOCOSTREAM_BATCHSIZE"),
    ({"MOCOSTREAM_STEPS": "ten"}, "MOCOSTREAM_STEPS must be an integer"),
    ({"MOCOSTREAM_RESUME": "maybe"}, "MOCOSTREAM_RESUME must be true or false"),
    ({"MOCOSTREAM_BASE_LR": "fast"}, "MOCOSTREAM_BASE_LR must be a number"),
])
def test_bad_environment_variables_are_named(env, message):
    with pytest.raises(ConfigError, match=message):
        env_values(env)


def test_unknown_key_in_a_toml_file_is_named(tmp_path, capsys):
    conf = tmp_path / "job.toml"
    conf.write_text('data = "/d"\nsteps = 3\nlearning_rate = 0.1\n')
    assert cli_main(["train", "--config", str(conf), "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == "mocostream: error: unknown option in config file: learning_rate"


def test_print_config_masks_secrets(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "job.yaml"
    conf.write_text("steps: 5\nknn-every: 100\n")
    monkeypatch.setenv("MOCOSTREAM_CONFIG", str(conf))
    monkeypatch.setenv("MOCOSTREAM_BATCH_SIZE", "48")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-very-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    assert cli_main(["train", "--data", "s3://reader:p4ssw0rd@bucket/shards", "--checkpoint-dir",
                     "https://u:hunter2@store/ckpt", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out)
    options, environment = printed["options"], printed["environment"]
    assert (options["steps"], options["knn_every"], options["batch_size"]) == (5, 100, 48)
    assert options["data"] == "s3://reader:***@bucket/shards"
    assert options["checkpoint_dir"] == "https://u:***@store/ckpt"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "***" and environment["AWS_SESSION_TOKEN"] == "***"
    assert environment["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"
    for secret in ("p4ssw0rd", "hunter2", "very-secret", "session-token-value"):
        assert secret not in out


def test_mask_secrets_leaves_plain_values():
    assert mask_secrets({"data": "s3://bucket/x", "steps": 3, "api_key": "k"}) == \
        {"data": "s3://bucket/x", "steps": 3, "api_key": "***"}


@pytest.mark.parametrize("batch,world,expected", [(256, 1, 8), (128, 1, 4), (64, 1, 2), (32, 1, 2), (8, 1, 2),
                                                  (6, 1, 1), (256, 2, 1)])
def test_auto_bn_splits_keeps_sub_batches_of_32(batch, world, expected):
    from mocostream.ops.train import auto_bn_splits

    cfg = build_config({}, {"data": "/d", "batch_size": batch}, environ={})
    assert auto_bn_splits(cfg, world) == expected
    cfg.bn_splits = 3
    assert auto_bn_splits(cfg, world) == 3


# Options defined once: every TrainConfig field is a flag, an environment variable, a config-file key and a
# --print-config entry, with choices from the registries that use them.

def _train_actions() -> dict:
    import argparse

    from mocostream.ops.cli import add_train_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_train_parser(sub)
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_every_option_has_a_flag_an_env_var_a_file_key_and_a_print_config_entry(tmp_path, capsys):
    import dataclasses

    from mocostream.ops.config import TrainConfig

    actions = _train_actions()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for name in names:
        assert "--" + name.replace("_", "-") in actions[name].option_strings, name
    # a value of the right type for each option, given once as a variable, once as a file key
    for name in names:
        typed = env_values({"MOCOSTREAM_" + name.upper(): "1" if name != "data" else "/d"})
        assert list(typed) == [name]
    conf = tmp_path / "all.json"
    conf.write_text(json.dumps({n: getattr(TrainConfig(), n) for n in names} | {"data": "/d"}))
    assert cli_main(["train", "--config", str(conf), "--print-config"]) == 0
    assert list(json.loads(capsys.readouterr().out)["options"]) == names


def test_arch_and_other_choices_come_from_the_registries():
    from mocostream.moco_core import ARCHS, LR_SCHEDULES, MOMENTUM_SCHEDULES, OPTIMIZERS
    from mocostream.ops.config import TrainConfig
    from mocostream.ops.options import ChoicesHelp, choices_of
    from mocostream.ops.precision import PRECISIONS
    from mocostream.pipeline.loader import PREFLIGHT
    from mocostream.pipeline.vocabulary import BACKEND_CHOICES, RECIPES

    fields = TrainConfig.__dataclass_fields__
    expected = {"arch": ARCHS, "backend": BACKEND_CHOICES, "lr_schedule": tuple(LR_SCHEDULES), "precision": PRECISIONS,
                "moco_momentum_schedule": MOMENTUM_SCHEDULES, "preflight_check": PREFLIGHT, "optimizer": OPTIMIZERS,
                "recipe": RECIPES}
    for name, registry in expected.items():
        assert choices_of(fields[name]) == tuple(registry), name
    assert len(ARCHS) == 9  # the help lists every one of them
    shown = ChoicesHelp("mocostream train")._get_help_string(_train_actions()["arch"])
    assert all(arch in shown for arch in ARCHS)
    for arch in ARCHS:
        assert build_config({}, {"data": "/d", "arch": arch, "recipe": "moco_v3"}, environ={}).arch == arch


def test_moco_v3_presets_follow_the_backbone_and_give_way_to_flags():
    """The reference's recipes: ViTs AdamW lr 1.5e-4 wd 0.1 T 0.2, ResNets LARS lr 0.6 wd 1e-6 T 1.0; both dim 256,
    m 0.99 rising on a cosine, warmup 10% of the steps then cosine. v1/v2 keep theirs."""
    vit = build_config({}, {"data": "/d", "recipe": "moco_v3", "arch": "vit_small", "steps": 300}, environ={})
    assert (vit.optimizer, vit.base_lr, vit.weight_decay, vit.temperature) == ("adamw", 1.5e-4, 0.1, 0.2)
    assert (vit.dim, vit.moco_momentum, vit.moco_momentum_schedule, vit.lr_schedule) == \
        (256, 0.99, "cosine", "cosine")
    assert vit.warmup_steps == 30 and vit.mlp_dim == 4096 and vit.stop_grad_conv1
    r50 = build_config({}, {"data": "/d", "recipe": "moco_v3", "arch": "resnet50"}, environ={})
    assert (r50.optimizer, r50.base_lr, r50.weight_decay, r50.temperature) == ("lars", 0.6, 1e-6, 1.0)
    assert r50.warmup_steps == 100  # of the default 1000 steps
    budget = build_config({}, {"data": "/d", "recipe": "moco_v3", "arch": "resnet50", "budget_minutes": 5},
                          environ={})
    assert budget.warmup_steps == 0  # no step count to take a share of: --warmup-steps sets it
    mine = build_config({}, {"data": "/d", "recipe": "moco_v3", "arch": "vit_tiny", "optimizer": "lars",
                             "temperature": 0.5, "moco_momentum_schedule": "constant", "warmup_steps": 3}, environ={})
    assert (mine.optimizer, mine.temperature, mine.moco_momentum_schedule, mine.warmup_steps) == \
        ("lars", 0.5, "constant", 3)
    with pytest.raises(ConfigError, match="--arch vit_small trains with --recipe moco_v3"):
        build_config({}, {"data": "/d", "arch": "vit_small"}, environ={})
    v2 = build_config({}, {"data": "/d"}, environ={})
    assert (v2.optimizer, v2.base_lr, v2.weight_decay, v2.dim, v2.moco_momentum, v2.moco_momentum_schedule,
            v2.warmup_steps) == ("sgd", 0.03, 1e-4, 128, 0.999, "constant", 0)


def test_moco_momentum_schedule_keeps_its_old_name_in_every_source(tmp_path, capsys, caplog):
    """--moco-momentum-schedule is the option; --momentum-schedule (its name before) still works as a flag, a
    config key and a variable, with a notice naming the new name; both names at once with two values is an error."""
    from mocostream.ops.options import ChoicesHelp

    def options(argv):
        assert cli_main(["train", "--data", "/d", *argv, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)["options"]

    assert options([])["moco_momentum_schedule"] == "constant"  # v2's
    assert "momentum_schedule" not in options([])  # one option, printed under its current name
    caplog.clear()
    assert options(["--moco-momentum-schedule", "cosine"])["moco_momentum_schedule"] == "cosine"
    assert "old name" not in caplog.text
    assert options(["--momentum-schedule", "cosine"])["moco_momentum_schedule"] == "cosine"
    assert "--momentum-schedule on the command line is the old name of --moco-momentum-schedule" in caplog.text
    conf = tmp_path / "job.yaml"
    conf.write_text("momentum-schedule: cosine\n")
    assert options(["--config", str(conf)])["moco_momentum_schedule"] == "cosine"
    assert "momentum_schedule in the config file is the old name of moco_momentum_schedule" in caplog.text
    caplog.clear()
    env = build_config({}, {"data": "/d"}, environ={"MOCOSTREAM_MOMENTUM_SCHEDULE": "cosine"})
    assert env.moco_momentum_schedule == "cosine" and "MOCOSTREAM_MOCO_MOMENTUM_SCHEDULE" in caplog.text
    flag_over_env = build_config({}, {"data": "/d", "moco_momentum_schedule": "constant"},
                                 environ={"MOCOSTREAM_MOMENTUM_SCHEDULE": "cosine"})
    assert flag_over_env.moco_momentum_schedule == "constant"  # precedence as for any option
    with pytest.raises(ConfigError, match="unknown --moco-momentum-schedule 'linear'"):
        build_config({"momentum_schedule": "linear"}, {"data": "/d"}, environ={})
    assert cli_main(["train", "--data", "/d", "--momentum-schedule", "cosine", "--moco-momentum-schedule", "constant",
                     "--print-config"]) == 2
    assert "--momentum-schedule and --moco-momentum-schedule on the command line name the same option" in \
        capsys.readouterr().err
    shown = ChoicesHelp("mocostream train")._get_help_string(_train_actions()["moco_momentum_schedule"])
    assert "old name: --momentum-schedule" in shown


@pytest.mark.parametrize("argv,message", [
    (["--arch", "resnet34"], "unknown --arch 'resnet34'; choose from resnet18, resnet50, "),
    (["--steps", "ten"], "--steps must be an integer, got 'ten'"),
    (["--base-lr", "fast"], "--base-lr must be a number, got 'fast'"),
    (["--precision", "fp8"], "unknown --precision 'fp8'; choose from auto, fp32, bf16, fp16"),
    (["--clip-grad", "-1"], "--clip-grad must be a norm >= 0 (0: no clipping)"),
    (["--clip-grad", "inf"], "--clip-grad must be a norm >= 0 (0: no clipping)"),
])
def test_a_bad_flag_value_is_one_line_and_exit_2(argv, message, capsys):
    assert cli_main(["train", "--data", "/d", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocostream: error: " + message) and err.count("\n") == 1


def test_bad_choice_from_the_environment_or_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown --backend 'jax'"):
        build_config({}, {"data": "/d"}, environ={"MOCOSTREAM_BACKEND": "jax"})
    with pytest.raises(ConfigError, match="unknown --recipe 'simclr'"):
        build_config({"recipe": "simclr"}, {"data": "/d"}, environ={})


def test_boolean_flags_and_their_negations(capsys):
    assert cli_main(["train", "--data", "/d", "--no-progress", "--resume", "--no-mlp", "--print-config"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]
    assert (options["progress"], options["resume"], options["mlp"]) == (False, True, False)


def test_loader_and_storage_configs_are_derived_from_the_train_config():
    import dataclasses

    import torch

    from mocostream.ops.pipeline_configs import loader_config, storage_config
    from mocostream.pipeline.loader import LoaderConfig

    cfg = build_config({}, {"data": "/d", "batch_size": 12, "workers": 3, "read_ahead_mb": 5, "epochs": 2,
                            "storage_retries": 7, "storage_timeout": 9.5, "preflight_check": "never"}, environ={})
    storage = storage_config(cfg)
    assert (storage.retries, storage.read_timeout) == (7, 9.5)
    loader = loader_config(cfg, storage, rank=1, world=4, device=torch.device("cpu"), local_rank=1)
    shared = [f.name for f in dataclasses.fields(LoaderConfig) if hasattr(cfg, f.name) and f.name != "device"]
    assert {n: getattr(loader, n) for n in shared} == {n: getattr(cfg, n) for n in shared}
    assert (loader.rank, loader.world, loader.device, loader.device_id) == (1, 4, "cpu", None)
    assert (loader.read_ahead_bytes, loader.preflight, loader.storage) == (5 << 20, "never", storage)
    gpu = loader_config(cfg, storage, rank=1, world=4, device=torch.device("cuda", 1), local_rank=1)
    assert (gpu.device, gpu.device_id) == ("gpu", 1)
    assert loader_config(cfg, storage, 0, 1, torch.device("cpu"), 0, workers=1).workers == 1  # the trainer's choice


def test_a_loader_field_that_is_not_an_option_nor_translated_is_refused():
    from dataclasses import make_dataclass

    from mocostream.ops.pipeline_configs import derive

    cfg = build_config({}, {"data": "/d"}, environ={})
    Loader = make_dataclass("Loader", [("batch_size", int), ("new_knob", int, 0)])
    with pytest.raises(TypeError, match=r"\['new_knob'\] are neither"):
        derive(Loader, cfg, {})
    assert derive(Loader, cfg, {"new_knob": 3}) == Loader(32, 3)


def test_the_test_runs_data_variable_is_no_training_option(monkeypatch, capsys):
    from helpers import DATA_ENV, SHARED_DATA

    from mocostream.ops.config import ENV_PREFIX

    assert not DATA_ENV.startswith(ENV_PREFIX)
    monkeypatch.setenv(DATA_ENV, str(SHARED_DATA))
    assert build_config({}, {"data": "/d"}).data == "/d"  # this test run's own environment
    assert cli_main(["train", "--data", "/d", "--print-config"]) == 0
    assert DATA_ENV not in json.loads(capsys.readouterr().out)["environment"]
    monkeypatch.setenv("MOCOSTREAM_SHARED_DATA", str(SHARED_DATA))  # the old name is an unknown option
    with pytest.raises(ConfigError, match="unknown option in environment variable MOCOSTREAM_SHARED_DATA"):
        build_config({}, {"data": "/d"})
