"""`sdf-ray train` input checks that need no Ray (they fail before it starts)."""

from __future__ import annotations

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
