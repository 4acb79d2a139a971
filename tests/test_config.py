"""Config loading: strictness, every problem at once, overrides, packaged configs, the CLI."""

from __future__ import annotations

import pytest

from sdf_ray import config as C
from sdf_ray.cli import main
from sdf_ray.errors import ConfigError


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_reference_workload():
    cfg = C.TrainConfig()
    assert (cfg.model.latent_size, cfg.model.hidden_dim, cfg.model.num_layers) == (256, 512, 8)
    assert cfg.model.latent_in_layers == (4,) and cfg.model.dropout == 0.2
    assert (cfg.data.scenes_per_step, cfg.data.samples_per_scene) == (64, 16384)
    assert (cfg.loss.clamp_dist, cfg.loss.code_reg_lambda) == (0.1, 1e-4)
    assert (cfg.optim.decoder_lr, cfg.optim.latent_lr, cfg.optim.lr_step_every_n_epochs) == (5e-4, 1e-3, 500)


def test_packaged_deepsdf_config_equals_reference_defaults():
    cfg = C.load(C.packaged_config("deepsdf"))
    ref = C.TrainConfig()
    for section in ("model", "loss"):
        assert getattr(cfg, section) == getattr(ref, section)
    assert (cfg.optim.decoder_lr, cfg.optim.latent_lr, cfg.optim.num_epochs) == (5e-4, 1e-3, 2000)
    assert (cfg.data.scenes_per_step, cfg.data.samples_per_scene) == (64, 16384)


@pytest.mark.parametrize("name", ["tiny", "demo", "deepsdf"])
def test_packaged_configs_load(name):
    cfg = C.load(C.packaged_config(name))
    assert cfg.checkpoint.run_name == name


def test_all_problems_reported_together(tmp_path):
    p = write(tmp_path, "guard:\n  grad_clp: 1\noptim:\n  decoder_lr: -1\n  latent_lr: abc\n"
                        "data:\n  samples_per_scene: 7\nmodle: {}\n")
    with pytest.raises(ConfigError) as e:
        C.load(p)
    problems = e.value.problems
    assert "`guard.grad_clp`: unknown key, did you mean `guard.grad_clip`?" in problems
    assert "`modle`: unknown key, did you mean `model`?" in problems
    assert any(s.startswith("`optim.latent_lr`: expected float") for s in problems)
    assert any(s.startswith("`optim.decoder_lr`: must be > 0") for s in problems)
    assert any(s.startswith("`data.samples_per_scene`: must be even") for s in problems)
    assert len(problems) == 5


def test_type_errors_name_the_dotted_path(tmp_path):
    p = write(tmp_path, "debug:\n  inject: [{step: 1, rank: 0, site: elbow}]\nmodel: {latent_in_layers: 4}\n")
    with pytest.raises(ConfigError) as e:
        C.load(p)
    assert any(s.startswith("`debug.inject[0].site`: expected one of 'loss'") for s in e.value.problems)
    assert any(s.startswith("`model.latent_in_layers`: expected a list") for s in e.value.problems)


def test_overrides_are_yaml_parsed_and_type_checked(tmp_path):
    p = write(tmp_path, "optim: {decoder_lr: 1.0e-3}\n")
    cfg = C.load(p, ["optim.decoder_lr=3e-4", "model.latent_in_layers=[2]", "model.num_layers=4",
                     "guard.enabled=false", "guard.grad_clip=0", "debug.crash={step: 5, rank: 1}"])
    assert cfg.optim.decoder_lr == 3e-4 and cfg.model.latent_in_layers == (2,)
    assert cfg.guard.enabled is False and cfg.debug.crash == C.CrashConfig(step=5, rank=1)
    with pytest.raises(ConfigError) as e:
        C.load(p, ["optim.decoder_lr=fast", "optim.nope=1", "novalue"])
    assert len(e.value.problems) == 3


def test_apply_overrides_round_trips_and_validates():
    cfg = C.TrainConfig()
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.apply_overrides(cfg, {"guard.grad_clip": 0.5}).guard.grad_clip == 0.5
    with pytest.raises(ConfigError):
        C.apply_overrides(cfg, {"guard.grad_clip": -1})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        C.load(write(tmp_path, "a: 1\n  b: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        C.load(write(tmp_path, "- 1\n"))


def test_scenes_per_step_must_split_over_workers():
    with pytest.raises(ConfigError, match="does not split evenly"):
        C.from_dict({"data": {"scenes_per_step": 5}, "scaling": {"num_workers": 2}})


def test_cli_check_and_print_config(tmp_path, capsys):
    good = write(tmp_path, "optim: {num_epochs: 3}\n", "good.yaml")
    assert main(["check-config", str(good)]) == 0
    assert main(["print-config", str(good), "--set", "optim.decoder_lr=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "decoder_lr: 0.01" in out and "num_epochs: 3" in out
    bad = write(tmp_path, "optim: {num_epochs: 0, decoder_lr: 0}\nfoo: 1\n", "bad.yaml")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 problems" in err
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
