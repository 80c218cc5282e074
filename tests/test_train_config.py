"""TrainConfig: flags, YAML defaults, presets, clear errors for unknown keys and bad values."""
import pytest

from core.config import TrainConfig, from_dict, parse_config, save_yaml, to_dict


def test_no_arguments_is_the_demo_preset():
    cfg = parse_config([])
    assert cfg.preset == "demo" and cfg.data is None
    assert cfg.backbone == "r18" and cfg.iters < 2000 and cfg.work_dir.endswith("demo")


def test_data_selects_the_full_cityscapes_recipe():
    cfg = parse_config(["--data", "/somewhere"])
    full = TrainConfig()
    assert cfg.preset == "cityscapes"
    assert (cfg.backbone, cfg.crop, cfg.iters, cfg.lr, cfg.momentum, cfg.weight_decay) == \
        ("r50", (512, 1024), 40000, 0.01, 0.9, 5e-4)
    assert (cfg.poly_power, cfg.min_lr, cfg.global_batch, cfg.aux_weight) == (0.9, 1e-4, 8, 0.4)
    assert cfg.loss_avg_non_ignore is False  # mmseg's default normalisation
    assert cfg.crop == full.crop


def test_flags_override_preset_and_parse_types():
    cfg = parse_config(["--crop", "64x128", "--lr", "0.5", "--sync-bn", "--no-channels-last", "--opt-level", "O2",
                        "--eval-scale", "none", "--output-stride", "16", "--resume", "auto"])
    assert cfg.crop == (64, 128) and cfg.lr == 0.5 and cfg.sync_bn and not cfg.channels_last
    assert cfg.opt_level == "O2" and cfg.eval_scale is None and cfg.output_stride == 16 and cfg.resume == "auto"


def test_yaml_fills_defaults_and_cli_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iters: 123\nlr: 0.05\ncrop: [32, 48]\nbackbone: r50\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.07"])
    assert cfg.iters == 123 and cfg.crop == (32, 48) and cfg.backbone == "r50"
    assert cfg.lr == 0.07


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--crop", "64x96", "--iters", "7", "--sync-bn"])
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert to_dict(again) == {**to_dict(cfg), "config": str(tmp_path / "config.yaml")}
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_yaml_key_fails_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.01\nweight_decy: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'weight_decy'.*did you mean weight_decay"):
        parse_config(["--config", str(path)])


def test_unknown_flag_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--learning-rate", "0.1"])
    assert exc.value.code == 2
    assert "--learning-rate" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--crop", "64"], "AxB"),
    (["--backbone", "r200"], "invalid choice"),
    (["--crop", "64.7x128"], "invalid literal"),
    (["--iter", "5"], "unrecognized arguments: --iter"),  # no abbreviation is taken for --iters
])
def test_bad_flag_values_fail(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert message in capsys.readouterr().err


def test_bad_yaml_values_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iters: many\n")
    with pytest.raises(ValueError, match="'iters'"):
        parse_config(["--config", str(path)])
    path.write_text("opt_level: O7\n")
    with pytest.raises(ValueError, match="'opt_level'"):
        parse_config(["--config", str(path)])
    with pytest.raises(FileNotFoundError, match="--config"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, message", [
    ("iters: true", "'iters': cannot use True (expected an integer)"),
    ("iters: null", "'iters': null is not allowed"),
    ("crop: [64.7, 128]", "'crop': cannot use [64.7, 128] (expected an integer)"),
    ("crop: {h: 64}", "'crop': cannot use {'h': 64} (expected two integers"),
    ("crop: [64]", "'crop'"),
    ("lr: false", "'lr'"),
    ("data: [a, b]", "'data'"),
    ("channels_last: 1", "'channels_last'"),
])
def test_yaml_values_are_checked_as_strictly_as_flags(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError) as err:
        parse_config(["--config", str(path)])
    assert message in str(err.value)


def test_yaml_accepts_what_the_flags_accept(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iters: 7\ncrop: [64, 128]\neval_tile: 32x48\neval_scale: null\nlr: 1\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.iters, cfg.crop, cfg.eval_tile, cfg.eval_scale, cfg.lr) == (7, (64, 128), (32, 48), None, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--eval-tile", "0x0"], "--eval-tile must be two sizes >= 1"),
    (["--crop", "0x64"], "--crop must be two sizes >= 1"),
    (["--init-loss-scale", "0"], "--init-loss-scale must be > 0"),
    (["--dist-timeout", "-5"], "--dist-timeout must be > 0"),
    (["--kill-grace", "-1"], "--kill-grace must be >= 0"),
])
def test_out_of_range_values_are_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_inconsistent_values_are_rejected():
    with pytest.raises(ValueError, match="--min-lr"):
        parse_config(["--lr", "0.001", "--min-lr", "0.01"])
    with pytest.raises(ValueError, match="--node-rank"):
        parse_config(["--nnodes", "2", "--node-rank", "2"])
    with pytest.raises(ValueError, match="--iters"):
        parse_config(["--iters", "0"])


def test_norm_and_backbone_choices_are_the_model_builders():
    # The config lists choices as literals (it imports no torch); they must be what core builds.
    import dataclasses

    from core.config import TrainConfig
    from core.model import BACKBONES
    from core.norm import NORMS
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert tuple(fields["norm"].metadata["choices"]) == NORMS
    assert set(fields["backbone"].metadata["choices"]) == set(BACKBONES) | {f"{b}-v1b" for b in BACKBONES}
