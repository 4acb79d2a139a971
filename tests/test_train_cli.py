"""`sdf-ray train` input checks that need no Ray (they fail before it starts)."""

from __future__ import annotations

import pytest

from sdf_ray.cli import main
from sdf_ray.config import packaged_config
from sdf_ray.data.synth import synth_dataset

TINY = str(packaged_config("tiny"))


def test_dataset_with_fewer_scenes_than_workers_is_refused(tmp_path, capsys):
    synth_dataset(tmp_path / "d", num_scenes=1, samples_per_scene=64, seed=0)
    code = main(["train", "--config", TINY, "--set", f"data.path={tmp_path / 'd'}",
                 "--set", f"checkpoint.storage_path={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "fewer than scaling.num_workers=2" in err and err.count("\n") == 1


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--config", TINY, "--set", f"data.path={tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sdf-ray: error:") and err.count("\n") == 1


def test_unreachable_address_is_a_one_line_error(tmp_path, capsys):
    synth_dataset(tmp_path / "d", num_scenes=4, samples_per_scene=64, seed=0)
    code = main(["train", "--config", TINY, "--set", f"data.path={tmp_path / 'd'}",
                 "--set", f"checkpoint.storage_path={tmp_path}", "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "no Ray cluster is reachable at 127.0.0.1:1" in err


def test_job_env_passes_the_gcs_address_and_a_fast_report_collection(monkeypatch):
    import json

    from sdf_ray.ray_session import HEALTH_CHECK_ENV, job_env_vars

    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_env_vars("127.0.0.1:1") == {"RAY_ADDRESS": "127.0.0.1:1", HEALTH_CHECK_ENV: "0.1"}
    # Tune keeps Ray's default: fast polls let a trial killed by the scheduler leak a placement group.
    assert job_env_vars("127.0.0.1:1", fast_reports=False) == {"RAY_ADDRESS": "127.0.0.1:1"}
    monkeypatch.setenv(HEALTH_CHECK_ENV, "0.5")  # the user's own choice travels with the job
    assert job_env_vars("127.0.0.1:1")[HEALTH_CHECK_ENV] == "0.5"
    # Inside `ray job submit` whose runtime env already sets it, setting it again would make Ray refuse
    # the driver ("Failed to merge the Job's runtime env").
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {HEALTH_CHECK_ENV: "0.1"}}}))
    assert job_env_vars("127.0.0.1:1") == {"RAY_ADDRESS": "127.0.0.1:1"}


# ---------------------------------------------------------------------------------------------
# `auto` precision and compile, resolved on the worker for its device


def _resolved(monkeypatch, device_capability, **overrides):
    """Resolve on a pretend device of this compute capability ((0, 0): a CPU)."""
    import torch

    from sdf_ray import device_settings
    from tests.helpers import tiny_config

    cfg = tiny_config(**overrides)
    monkeypatch.setattr(device_settings, "_capability", lambda device: device_capability)
    device = torch.device("cuda" if device_capability[0] else "cpu")
    return cfg, device_settings.resolve_for_device(cfg, device)


def test_auto_is_fp32_and_eager_on_a_cpu():
    import torch

    from sdf_ray.device_settings import describe, resolve_for_device
    from tests.helpers import tiny_config

    cfg = tiny_config(**{"optim.precision": "auto", "model.compile": "auto"})
    resolved = resolve_for_device(cfg, torch.device("cpu"))
    assert (resolved.optim.precision, resolved.model.compile) == ("fp32", False)
    assert describe(cfg, resolved) == "precision fp32 (auto), compile off (auto)"
    assert resolved.model.latent_size == cfg.model.latent_size and resolved.optim.decoder_lr == cfg.optim.decoder_lr


@pytest.mark.parametrize(("capability", "precision", "compile_"), [
    ((9, 0), "bf16", True),   # Hopper
    ((8, 0), "bf16", True),   # Ampere: native bf16
    ((7, 5), "fp32", True),   # Turing: no native bf16, Triton compiles
    ((6, 1), "fp32", False),  # Pascal: Triton does not
])
def test_auto_on_cuda_devices(monkeypatch, capability, precision, compile_):
    _, resolved = _resolved(monkeypatch, capability, **{"optim.precision": "auto", "model.compile": "auto"})
    assert (resolved.optim.precision, resolved.model.compile) == (precision, compile_)


@pytest.mark.parametrize("capability", [(0, 0), (9, 0)])
def test_explicit_settings_win(monkeypatch, capability):
    for precision in ("fp32", "tf32", "bf16"):
        for compile_ in (True, False):
            cfg, resolved = _resolved(monkeypatch, capability, **{"optim.precision": precision, "model.compile": compile_})
            assert resolved == cfg


def test_compile_accepts_auto_and_booleans_only():
    from sdf_ray.errors import ConfigError
    from tests.helpers import tiny_config

    assert tiny_config(**{"model.compile": "auto"}).model.compile == "auto"
    for bad in (1, "yes please", 0):
        with pytest.raises(ConfigError, match="model.compile"):
            tiny_config(**{"model.compile": bad})
    with pytest.raises(ConfigError, match="optim.precision"):
        tiny_config(**{"optim.precision": "fp16"})


def test_compile_cacheable_accepts_auto_and_booleans_and_never_blocks_a_resume(tmp_path):
    """Both spellings compute the same values, so a run may resume with another setting, or from a config written
    before the setting existed; a change to what the model computes is still refused."""
    import yaml

    from sdf_ray.errors import ConfigError
    from sdf_ray.launch import prepare_run_dir
    from sdf_ray.run_files import RESOLVED_CONFIG_FILE
    from tests.helpers import tiny_config

    for bad in (1, "sometimes"):
        with pytest.raises(ConfigError, match="model.compile_cacheable"):
            tiny_config(**{"model.compile_cacheable": bad})
    cfg = tiny_config(**{"checkpoint.storage_path": str(tmp_path)})
    directory, resuming = prepare_run_dir(cfg, overwrite=False)
    assert not resuming
    saved = yaml.safe_load((directory / RESOLVED_CONFIG_FILE).read_text())
    del saved["model"]["compile_cacheable"]  # a run directory from before the setting
    (directory / RESOLVED_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    changed = tiny_config(**{"checkpoint.storage_path": str(tmp_path), "model.compile_cacheable": False})
    assert prepare_run_dir(changed, overwrite=False) == (directory, True)
    with pytest.raises(ConfigError, match="model.dropout"):
        prepare_run_dir(tiny_config(**{"checkpoint.storage_path": str(tmp_path), "model.dropout": 0.1}),
                        overwrite=False)


def test_the_compile_cache_goes_under_the_storage_path_and_a_set_variable_wins(monkeypatch, tmp_path):
    from sdf_ray.device_settings import COMPILE_CACHE_ENV, use_compile_cache
    from sdf_ray.launch import compile_cache_dir

    for name in COMPILE_CACHE_ENV:  # setenv first: monkeypatch then restores the variable's absence afterwards
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    cache = compile_cache_dir(str(tmp_path))
    assert cache == str(tmp_path / ".compile-cache")
    assert use_compile_cache(cache) == {"TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
                                        "TRITON_CACHE_DIR": f"{cache}/triton"}
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    assert use_compile_cache(cache) == {"TORCHINDUCTOR_CACHE_DIR": "/mine", "TRITON_CACHE_DIR": "/elsewhere"}
