"""Training configuration for jobs: recipes, config files, MOCOSTREAM_* environment variables, flags,
their precedence, unknown keys, and --print-config with secrets masked."""
from __future__ import annotations

import json

import pytest

from ops.cli import main as cli_main
from ops.config import ConfigError, build_config, env_values, mask_secrets


def test_recipes_fill_the_paper_defaults_and_every_value_can_be_overridden():
    v1 = build_config({}, {"data": "/d", "recipe": "moco_v1"}, environ={})
    assert (v1.temperature, v1.mlp, v1.lr_schedule) == (0.07, False, "step")
    v2 = build_config({}, {"data": "/d", "recipe": "moco_v2"}, environ={})
    assert (v2.temperature, v2.mlp, v2.lr_schedule) == (0.2, True, "cosine")
    for cfg in (v1, v2):  # shared by both papers
        assert (cfg.base_lr, cfg.sgd_momentum, cfg.weight_decay, cfg.moco_momentum) == (0.03, 0.9, 1e-4, 0.999)
    custom = build_config({}, {"data": "/d", "recipe": "moco_v2", "temperature": 0.5, "mlp": False,
                               "lr_schedule": "step", "momentum_schedule": "cosine", "symmetric": True},
                          environ={})
    assert (custom.temperature, custom.mlp, custom.lr_schedule, custom.momentum_schedule, custom.symmetric) == \
        (0.5, False, "step", "cosine", True)


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
    from ops.train import auto_bn_splits

    cfg = build_config({}, {"data": "/d", "batch_size": batch}, environ={})
    assert auto_bn_splits(cfg, world) == expected
    cfg.bn_splits = 3
    assert auto_bn_splits(cfg, world) == 3
