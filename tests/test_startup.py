"""The start-up breakdown: its arithmetic (no Ray), and one real `sdf-ray train` in a fresh process (Ray)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdf_ray import startup
from sdf_ray.config import packaged_config
from sdf_ray.startup import STARTUP_KEY, TEARDOWN_KEY, StartupClock, phases, summary_fields

ALL = {name: float(i) for i, name in enumerate(startup.MARK_NAMES)}  # one second per phase


def phase_sum(fields: dict, end_marks: set[str]) -> float:
    return sum(seconds for phase, seconds, end in phases(fields[startup.MARKS_KEY]) if end in end_marks)


def test_every_phase_adds_up_to_the_totals():
    fields = summary_fields(ALL)
    first = startup.MARK_NAMES.index("first_step_done")
    assert fields[STARTUP_KEY] == first  # origin -> first step done: one second per phase
    assert fields[startup.FIRST_STEP_KEY] == 1.0
    assert fields[TEARDOWN_KEY] == len(startup.MARK_NAMES) - 1 - startup.MARK_NAMES.index("last_step_done")
    per_phase = {k: v for k, v in fields.items() if k.startswith("perf/phase/")}
    assert len(per_phase) == len(startup.MARK_NAMES) - 1 and set(per_phase.values()) == {1.0}
    assert "perf/phase/ray_start_seconds" in per_phase and "perf/phase/trainer_shutdown_seconds" in per_phase


def test_the_shapes_timeline_adds_up_the_same_way_and_says_shape():
    """`reconstruct` and `mesh` use the same arithmetic over their own marks (one second per phase here)."""
    names = startup.SHAPES.names
    marks = {name: float(i) for i, name in enumerate(names)}
    fields = summary_fields(marks, startup.SHAPES)
    assert fields[STARTUP_KEY] == names.index("first_shape_done")
    assert fields[TEARDOWN_KEY] == len(names) - 1 - names.index("last_shape_done") == 1.0
    assert startup.FIRST_STEP_KEY not in fields  # training's compile phase has no counterpart here
    text = startup.format_breakdown({**fields, "startup_origin": "command"}, startup.SHAPES)
    assert "first shape done 8.0 s after the command, teardown 1.0 s after the last shape" in text
    assert "  shapes    shapes " in text and "  start-up  actor_init " in text
    clock = StartupClock(origin=100.0, timeline=startup.SHAPES)
    with pytest.raises(AssertionError):
        clock.mark("first_step_done")  # a training mark is not one of this timeline's


def test_a_missing_mark_merges_its_phase_into_the_next():
    marks = {k: v for k, v in ALL.items() if k not in ("data_loaded", "worker_group_up", "process_group_ready")}
    fields = summary_fields(marks)
    assert fields["perf/phase/data_load+state_build_seconds"] == 2.0
    assert fields["perf/phase/worker_group_start+process_group_init+train_fn_launch_seconds"] == 3.0
    assert fields[STARTUP_KEY] == summary_fields(ALL)[STARTUP_KEY]
    assert STARTUP_KEY not in summary_fields({"origin": 0.0, "config_checked": 1.0})  # no first step: no total


def test_marks_from_clocks_that_disagree_never_give_negative_phases():
    marks = {**ALL, "worker_group_up": ALL["fit_start"] - 0.5}  # the controller's node clock runs behind
    fields = summary_fields(marks)
    values = [v for k, v in fields.items() if k.startswith("perf/phase/")]
    assert min(values) >= 0
    assert fields[STARTUP_KEY] == pytest.approx(sum(s for _, s, end in phases(marks)
                                                    if startup.MARK_NAMES.index(end) <= startup.MARK_NAMES.index("first_step_done")))


def test_the_clock_travels_as_plain_data_and_the_driver_completes_the_workers_summary():
    driver = StartupClock(origin=1000.0)
    driver.mark("config_checked", at=1001.0)
    worker = StartupClock.from_dict(json.loads(json.dumps(driver.to_dict())))
    worker.mark("first_step_done", at=1010.0)
    worker.mark("first_step_done", at=1011.0, keep_first=True)
    worker.mark("last_step_done", at=1020.0)
    summary = {"status": "finished", **worker.summary_fields()}
    driver.mark("exit", at=1023.5)
    done = driver.complete(summary)
    assert done["startup_marks"] == {"origin": 0.0, "config_checked": 1.0, "first_step_done": 10.0,
                                     "last_step_done": 20.0, "exit": 23.5}
    assert done[STARTUP_KEY] == 10.0 and done[TEARDOWN_KEY] == 3.5 and done["status"] == "finished"
    assert done["startup_origin"] == "command"
    text = startup.format_breakdown(done)
    assert "first step done 10.0 s after the command" in text and "teardown 3.5 s" in text


def test_the_process_start_is_before_now():
    started = startup.process_start_time()
    assert started <= time.time() and time.time() - started < 3600


# ---------------------------------------------------------------------------------------------
# One real run, in a process of its own: a fresh embedded Ray, as a user's command starts it.


@pytest.mark.ray
def test_a_healthy_run_reports_its_startup_and_prints_no_resource_request_traceback(tmp_path):
    from sdf_ray.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, num_scenes=8, samples_per_scene=512, seed=0)
    # A variable Ray Train propagates to its controller and workers: the prestarted processes' runtime envs carry it.
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    env.pop("RAY_ADDRESS", None)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "sdf_ray.cli", "train", "--config", str(packaged_config("tiny")),
           "--set", f"data.path={data}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
           "--set", "optim.precision=auto", "--set", "model.compile=auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540, cwd=Path(__file__).parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Ray Train's controller logs to the driver's stderr; a healthy run shows no traceback from it.
    assert "Failed to send resource request" not in out and "GetTimeoutError" not in out, out[-4000:]

    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["compile"] is False  # auto on a CPU
    cache = tmp_path / "runs" / ".compile-cache"
    assert summary["compile_cache"] == {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                                        "TRITON_CACHE_DIR": str(cache / "triton")}  # as the worker saw them
    marks = summary["startup_marks"]
    assert set(startup.MARK_NAMES) - set(marks) <= {"data_loaded"}  # until run_training takes on_phase
    for key in (STARTUP_KEY, startup.FIRST_STEP_KEY, TEARDOWN_KEY):
        assert summary[key] >= 0, key
    listed = phases(marks)
    assert all(seconds >= 0 for _, seconds, _ in listed)
    first, last = startup.MARK_NAMES.index("first_step_done"), startup.MARK_NAMES.index("last_step_done")
    assert summary[STARTUP_KEY] == pytest.approx(sum(s for _, s, e in listed if startup.MARK_NAMES.index(e) <= first),
                                                 abs=1e-3)
    assert summary[TEARDOWN_KEY] == pytest.approx(sum(s for _, s, e in listed if startup.MARK_NAMES.index(e) > last),
                                                  abs=1e-3)
    assert summary[STARTUP_KEY] == pytest.approx(marks["first_step_done"], abs=1e-3)
    assert summary[STARTUP_KEY] + summary["perf/phase/training_seconds"] + summary[TEARDOWN_KEY] == pytest.approx(
        marks["exit"], abs=1e-3)
    # Ray ran sdf-ray's setup hook in the Train worker (not job-wide: the controller must not import torch).
    assert summary["startup_worker_imports_preloaded"] is True
    # The embedded Ray's raylet started the controller's and rank 0's processes before fit() with the runtime envs
    # Ray Train then gave them: the envs sdf-ray computed are Ray's own, string for string (the raylet hashes the
    # string), read in the processes that ran (ray_session.prestart_train_processes).
    assert summary["startup_prestart_requested"] is True
    assert set(summary["startup_runtime_envs"]) == {"controller", "rank0"}
    assert summary["startup_runtime_envs"] == summary["startup_prestart_runtime_envs"]
    assert "prestarted for them" not in out
    # And Ray used them. Which it takes is the raylet's choice: once in CI a lease for rank 0 got a fresh process
    # although the prestarted one matched; a prestart Ray ignored would leave both unused.
    used = summary["startup_prestarted"]
    assert set(used) == {"controller", "rank0"} and any(used.values()), used
    assert "device cpu  precision fp32  compile off" in proc.stdout
    assert "first step done" in proc.stdout and "ray_start" in proc.stdout


@pytest.mark.parametrize("which", ["driver", "worker"])
def test_the_modules_imported_in_a_thread_do_not_import_ray(which):
    """``launch.DRIVER_IMPORTS`` are imported in a thread beside ``ray.init``, ``startup.WORKER_IMPORTS`` beside a
    Ray Train worker's set-up: one that imported Ray could wait on the main thread's imports while the main thread
    waits on it."""
    from sdf_ray.launch import DRIVER_IMPORTS

    modules = DRIVER_IMPORTS if which == "driver" else startup.WORKER_IMPORTS + startup.COMPILER_IMPORTS
    code = f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_worker_setup_hook_returns_at_once_and_imports_in_a_daemon_thread():
    for hook, compiler in (("start_worker_imports", "True"), ("start_worker_imports_eager", "False")):
        code = (f"import sys, time; from sdf_ray import startup; t = time.time(); startup.{hook}(); "
                "returned = time.time() - t; thread = startup._WORKER_IMPORTS[0]; print(thread._thread.daemon, "
                "'torch._dynamo' in sys.modules); thread.finish(); print(returned < 0.5, startup.worker_imports_started(), "
                "all(m in sys.modules for m in startup.WORKER_IMPORTS), 'torch._inductor.compile_fx' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["True", "False", "True", "True", "True", compiler], out.stderr[-2000:]


def test_the_process_group_set_up_waits_for_the_early_imports_so_compiling_at_once_is_safe():
    """``torch._dynamo`` and ``torch._inductor`` import each other: compiling in the main thread while the hook's
    thread is still importing deadlocked (``_DeadlockError``, seen on a CPU). sdf-ray's process-group set-up, the
    worker's first torch import, waits for the thread; compiling and stepping straight after it must work."""
    # Ray Train's worker-side helpers need a Train context: stand-ins record whether the thread was still importing
    # when the set-up reached them (the module is put in sys.modules, so importing it imports nothing).
    code = (
        "import sys, types\n"
        "from sdf_ray import startup\n"
        "startup.start_worker_imports()\n"
        "thread = startup._WORKER_IMPORTS[0]._thread\n"
        "seen = []\n"
        "helpers = types.ModuleType('ray.train.torch.config')\n"
        "helpers._set_torch_distributed_env_vars = lambda: seen.append(thread.is_alive())\n"
        "helpers._setup_torch_process_group = lambda **kw: seen.append(thread.is_alive())\n"
        "sys.modules['ray.train.torch.config'] = helpers\n"
        "from sdf_ray.ray_session import _init_torch_process_group\n"
        "_init_torch_process_group('127.0.0.1', 29999, 'gloo', 0, 1, 60)\n"
        "import torch\n"
        "from sdf_ray.device_settings import compile_module\n"
        "m = compile_module(torch.nn.Linear(4, 4), 'default')\n"
        "torch.optim.Adam(m.parameters())\n"
        "print('thread alive when torch was set up:', seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "thread alive when torch was set up: [False, False]" in out.stdout


@pytest.mark.parametrize("user_value", [None, "/theirs"])
def test_the_compile_cache_survives_torch_setting_its_default_during_the_early_imports(user_value):
    """``import torch._dynamo`` sets TORCHINDUCTOR_CACHE_DIR to torch's default; the run's shared cache must still
    win over that default, and a user's own value over both."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    if user_value:
        env["TORCHINDUCTOR_CACHE_DIR"] = user_value
    code = ("import os; from sdf_ray import startup; startup.start_worker_imports(); startup._WORKER_IMPORTS[0].finish(); "
            "torch_set = os.environ.get('TORCHINDUCTOR_CACHE_DIR'); "
            "from sdf_ray.device_settings import use_compile_cache; "
            "print(torch_set, use_compile_cache('/shared')['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    torch_set, chosen = out.stdout.split()
    if user_value:
        assert chosen == user_value
    else:
        assert torch_set != "None" and chosen == "/shared/inductor"  # torch did set its default, and lost


def test_the_early_imports_never_ask_cuda_anything():
    """Ray sets a worker's CUDA_VISIBLE_DEVICES after the hook's thread has started: nothing it imports may query or
    initialise CUDA (torch caches the device count; a context would see every GPU of the node)."""
    code = (
        "import importlib, torch\n"
        "calls = []\n"
        "for name in ('device_count', 'is_available', '_lazy_init', 'init', 'get_device_properties',\n"
        "             'get_device_capability', 'current_device', 'set_device'):\n"
        "    real = getattr(torch.cuda, name)\n"
        "    setattr(torch.cuda, name, (lambda n, r: lambda *a, **k: calls.append(n) or r(*a, **k))(name, real))\n"
        "from sdf_ray import startup\n"
        "for module in startup.WORKER_IMPORTS + startup.COMPILER_IMPORTS:\n"
        "    importlib.import_module(module)\n"
        "print('cuda calls:', calls)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cuda calls: []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_train_workers_get_the_setup_hook_unless_the_job_has_its_own(monkeypatch):
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from sdf_ray import ray_session

    monkeypatch.delenv(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, raising=False)
    for compiles, hook in ((True, startup.start_worker_imports), (False, startup.start_worker_imports_eager)):
        env = ray_session.train_worker_runtime_env(compiles)
        module, _, name = env["env_vars"][WORKER_PROCESS_SETUP_HOOK_ENV_VAR].rpartition(".")
        assert getattr(importlib.import_module(module), name) is hook
    # A hook given to this driver's ray.init (Ray keeps it in the job's runtime env): theirs runs.
    import ray

    class Context:
        runtime_env = {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "their_package.setup"}}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", Context)
    assert ray_session.train_worker_runtime_env(True) == {}
    monkeypatch.setattr(Context, "runtime_env", {})
    assert ray_session.train_worker_runtime_env(True) != {}
    # Under `ray job submit` with a hook (Ray exports it to the driver's environment): theirs runs.
    monkeypatch.setenv(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, "their_package.setup")
    assert ray_session.train_worker_runtime_env(True) == {}


def test_the_cli_parser_does_not_import_torch():
    """Every command pays for what building the parser imports (``sdf-ray --help`` included)."""
    code = "import sys; from sdf_ray.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_failed_background_import_is_raised_as_it_happened():
    from sdf_ray.startup import BackgroundImports

    imports = BackgroundImports(["json", "sdf_ray_no_such_module_here"])
    with pytest.raises(ModuleNotFoundError, match="sdf_ray_no_such_module_here"):
        imports.finish()
    BackgroundImports(["json"]).finish()  # a clean one finishes quietly


def test_the_training_function_module_leaves_optional_heavy_imports_for_later():
    """Every worker imports ``sdf_ray.worker`` at start-up; the metrics of validation meshes (scipy.spatial) load
    only when a validation measures a mesh."""
    code = "import sys, sdf_ray.worker; print('scipy.spatial' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ray_trains_controller_can_use_the_backend_config_without_importing_torch():
    """Ray Train's controller unpickles the backend config, builds its backend and reads its framework; with
    Ray's TorchConfig that imported torch there (7-8 s in a fresh process on the H200 machine)."""
    from ray import cloudpickle

    from sdf_ray.ray_session import train_backend_config

    config = train_backend_config("gloo")
    assert config.to_dict() == {"backend": "gloo", "init_method": "env", "timeout_s": 1800}
    code = ("import sys; from ray import cloudpickle; config = cloudpickle.loads(sys.stdin.buffer.read()); "
            "backend = config.backend_cls(); print(config.framework, backend.share_cuda_visible_devices, "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(config), capture_output=True,
                         check=True)
    assert out.stdout.decode().split() == ["TrainingFramework.TORCH", "True", "False"], out.stderr.decode()[-2000:]


def test_prestarting_happens_for_an_embedded_ray_only_and_before_the_coordinator(monkeypatch):
    """A cluster's raylets do not have the driver's environment and its workers may land on any node: only a Ray this
    command started gets processes ahead of need, first thing after it is up."""
    import ray

    from sdf_ray import ray_session

    calls = []
    monkeypatch.setattr(ray_session, "start_autoscaling_coordinator", lambda: calls.append("coordinator"))
    monkeypatch.setattr(ray_session, "_start_embedded_ray", lambda fast_reports: "test")
    monkeypatch.setattr(ray_session, "_probe", lambda gcs_address: None)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_session.connect_ray(None, prestart=lambda: calls.append("prestart"))
    assert calls == ["prestart", "coordinator"]
    calls.clear()
    ray_session.connect_ray("127.0.0.1:6379", prestart=lambda: calls.append("prestart"))
    assert calls == ["init", "coordinator"]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    calls.clear()
    ray_session.connect_ray(None, prestart=lambda: calls.append("prestart"))
    assert calls == []


def test_sdf_ray_prestart_0_asks_ray_for_nothing(monkeypatch):
    from sdf_ray import ray_session

    monkeypatch.setenv(ray_session.PRESTART_ENV, "0")
    monkeypatch.setattr(ray_session, "train_process_runtime_envs", lambda *a: pytest.fail("computed envs"))
    assert ray_session.prestart_train_processes(1, {}) is None


def test_the_prestarted_runtime_envs_merge_and_serialise_as_ray_does():
    """The merge (CoreWorker::OverrideRuntimeEnv: env vars merge, other fields of the child win) and the string the
    raylet hashes: nlohmann's dump() for a merged env (sorted keys, no spaces, non-ASCII kept), Python's own
    serialisation for a child without a parent, the parent's string untouched for an empty child."""
    from sdf_ray.ray_session import child_runtime_env

    job = '{"env_vars": {"RAY_ADDRESS": "127.0.0.1:1", "Z": "\u00fc"}, "working_dir": "gcs://job.zip"}'
    assert child_runtime_env(job, {"env_vars": {"A": "1"}, "working_dir": "gcs://w.zip"}) == (
        '{"env_vars":{"A":"1","RAY_ADDRESS":"127.0.0.1:1","Z":"ü"},"working_dir":"gcs://w.zip"}')
    assert child_runtime_env("{}", {"env_vars": {"B": "2", "A": "1"}}) == '{"env_vars": {"A": "1", "B": "2"}}'
    assert child_runtime_env(job, {"env_vars": {}}) == job


def test_the_prestarted_runtime_envs_carry_what_ray_train_propagates(monkeypatch):
    """The variables in the controller's and the workers' runtime envs are the ones Ray Train's own functions give,
    in a driver and a controller with the same environment (a variable the user set wins over Ray Train's default)."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    from sdf_ray.ray_session import train_process_runtime_envs

    environ = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "90", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "1", "PATH": "/bin"}
    job = '{"env_vars": {"RAY_ADDRESS": "127.0.0.1:1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}'
    custom = {"env_vars": {"HOOK": "m.f"}}
    controller, workers = train_process_runtime_envs(job, custom, environ)
    job_vars = json.loads(job)["env_vars"]
    monkeypatch.setattr(os, "environ", dict(environ))
    ray_controller_vars = get_env_vars_to_propagate()  # what DataParallelTrainer passes to its controller
    assert json.loads(controller)["env_vars"] == {**job_vars, **ray_controller_vars}
    monkeypatch.setattr(os, "environ", {**environ, **json.loads(controller)["env_vars"]})  # inside the controller
    ray_worker_vars = WorkerGroup._get_worker_runtime_env(custom)["env_vars"]
    assert json.loads(workers)["env_vars"] == {**json.loads(controller)["env_vars"], **ray_worker_vars}
    assert json.loads(workers)["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "90"


def test_a_failing_prestart_never_fails_the_connection(monkeypatch):
    import ray

    from sdf_ray import ray_session

    monkeypatch.setattr(ray_session, "start_autoscaling_coordinator", lambda: None)
    monkeypatch.setattr(ray_session, "_start_embedded_ray", lambda fast_reports: "test")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def broken() -> None:
        raise RuntimeError("an upgraded Ray moved something")

    assert ray_session.connect_ray(None, prestart=broken) == "embedded local Ray (test)"


def test_the_summary_says_which_processes_were_prestarted():
    from sdf_ray.launch import prestarted_processes

    marks = {"fit_start": 8.0, "controller_process_started": 6.6, "worker_process_started": 9.1}
    assert prestarted_processes(marks) == {"startup_prestarted": {"controller": True, "rank0": False}}
    assert prestarted_processes({"controller_process_started": 6.6}) == {}
    assert prestarted_processes({"fit_start": 8.0}) == {}
    from sdf_ray.launch import unused_prestart_warning

    asked = {"controller": "c1", "rank0": "w1"}
    assert unused_prestart_warning({"startup_prestart_runtime_envs": asked, "startup_runtime_envs": asked}) is None
    line = unused_prestart_warning({"startup_prestart_runtime_envs": asked,
                                    "startup_runtime_envs": {"controller": "c1", "rank0": "w2"}})
    assert "(rank0)" in line and "SDF_RAY_PRESTART=0" in line
    # Not asked, or a process that could not tell its runtime env: nothing to compare.
    assert unused_prestart_warning({"startup_runtime_envs": {"controller": "c2", "rank0": "w2"}}) is None
    assert unused_prestart_warning({"startup_prestart_runtime_envs": asked, "startup_runtime_envs": {}}) is None
    # After a restart, rank 0's mark is its new process's: only the controller is told.
    assert prestarted_processes({**marks, "worker_process_started": 1.0}, restarts=1) == {
        "startup_prestarted": {"controller": True}}


def test_only_ray_train_commands_start_its_autoscaling_coordinator(monkeypatch):
    """The coordinator is an actor process that imports Ray Data; `reconstruct`, `mesh` and `data import-meshes`
    run no Ray Train and must not pay for it (a new connection either way; an existing session starts nothing)."""
    import ray

    from sdf_ray import ray_session

    started = []
    monkeypatch.setattr(ray_session, "start_autoscaling_coordinator", lambda: started.append(True))
    monkeypatch.setattr(ray_session, "_start_embedded_ray", lambda fast_reports: "test")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_session.connect_ray(None, ray_train=False) == "embedded local Ray (test)"
    assert started == []
    ray_session.connect_ray(None)
    assert started == [True]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert ray_session.connect_ray(None) == ray_session.EXISTING_SESSION
    assert started == [True]
