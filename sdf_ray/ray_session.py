"""The Ray session: connect to a cluster (or start an embedded local Ray), give every process of the job
the environment it needs, and keep each workaround for Ray's behaviour in one place.

This is the only module that calls ``ray.init`` or reaches into Ray's private API (``ray._private``,
``ray._raylet``, ``ray.train.v2._internal``, Tune's private attributes); a test asserts both. It imports
Ray lazily, so the CLI can report a user error before Ray is loaded.

Each workaround below is marked ``Workaround:`` with the Ray issue behind it (or, where there is none, what
was observed on which Ray version) and ``Delete when:`` the condition under which it can go. The placement
groups that Ray Train leaks when Tune stops a trial are reaped by a Tune callback of its own,
``tuning/reaper.py``, documented the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sdf_ray.errors import ClusterError, first_line

log = logging.getLogger("sdf_ray")

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
FAST_HEALTH_CHECK_S = "0.1"
EXISTING_SESSION = "existing Ray session"
"""What :func:`connect_ray` returns when this process was connected already (a caller that did not start the
session leaves it running)."""
# Workaround: report collection. Ray Train V2 workers hand each ``ray.train.report`` to a queue of size 1
# (``ray/train/v2/_internal/execution/context.py``) that the controller drains once per health check,
# every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default): a worker that reports more often than that
# blocks in report. Measured on an H200 with Ray 2.60: logging every 40 steps (1.3 s) held training to one
# interval per 2 s, 20.9 M instead of 31.6 M samples/s. Polling 10x a second costs one small RPC per worker
# per poll. No Ray issue found; the size-1 queue is deliberate (ray-project/ray PR #55637 left a TODO to
# measure the time a report waits).
# Not for Tune (``fast_reports=False``): a controller that polls this often notices its workers dying while
# Tune is killing the trial, retries, and creates a placement group that outlives it (see tuning/reaper.py).
# Delete when: a report no longer waits for the controller's next poll. Check: train the demo config with
# ``logging.every_n_steps`` giving reports under 2 s apart and this variable unset; samples/s must not drop.


def job_env_vars(gcs_address: str, *, fast_reports: bool = True) -> dict[str, str]:
    """Environment for every process of the job (Ray Train's controller and workers included).

    ``RAY_ADDRESS`` always (see :func:`connect_ray`); ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` with
    ``fast_reports`` unless the user set it (their value travels with the job). Under ``ray job submit``
    the job's runtime env comes first: Ray refuses a driver whose runtime env sets a variable the job's
    runtime env already sets ("Failed to merge the Job's runtime env").
    """
    env = {"RAY_ADDRESS": gcs_address}
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if fast_reports and HEALTH_CHECK_ENV not in ((job_config.get("runtime_env") or {}).get("env_vars") or {}):
        env[HEALTH_CHECK_ENV] = os.environ.get(HEALTH_CHECK_ENV, FAST_HEALTH_CHECK_S)
    return env


def connect_ray(address: str | None, *, fast_reports: bool = True, import_meanwhile: Sequence[str] = (),
                ray_train: bool = True, prestart: Callable[[], object] | None = None) -> str:
    """Connect to ``address`` / ``RAY_ADDRESS``, else start an embedded local Ray; returns a description.

    ``fast_reports``: Ray Train collects reports every 0.1 s instead of 2 s (see ``HEALTH_CHECK_ENV``); off
    for Tune sweeps. ``ray_train``: the command runs Ray Train, whose autoscaling coordinator is started early (see
    below); the shapes and meshes commands do not, and skip that actor's process. ``import_meanwhile``: modules
    the command needs next (torch: 1.3 s on a 2-core machine), imported in a thread while Ray starts; only modules
    that do not import Ray, so that the two threads never wait on each other's imports. ``prestart``: called as soon
    as an embedded Ray is up, before anything else (``launch.prestart_processes``: the run's processes start while
    the driver goes on). Problems are ``ClusterError`` (one line, exit 2).
    """
    import ray

    from sdf_ray.startup import BackgroundImports

    imports = BackgroundImports(import_meanwhile) if import_meanwhile else None
    try:
        return _connect(ray, address, fast_reports, ray_train, prestart)
    finally:
        if imports is not None:
            imports.finish()


def _connect(ray: Any, address: str | None, fast_reports: bool, ray_train: bool,
             prestart: Callable[[], object] | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return EXISTING_SESSION
    if address:
        gcs_address = _gcs_address(address)
        _probe(gcs_address)
        try:
            ray.init(address=gcs_address, logging_level=logging.WARNING,
                     runtime_env={"env_vars": job_env_vars(gcs_address, fast_reports=fast_reports)})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {gcs_address}: {first_line(exc)}") from None
        description = f"Ray cluster at {gcs_address}"
    else:
        description = f"embedded local Ray ({_start_embedded_ray(fast_reports)})"
        if prestart is not None:
            try:
                prestart()
            except Exception as exc:  # a head start, never a reason to fail: the run starts its processes as before
                log.debug("prestart failed: %s", first_line(exc))
    if ray_train:
        start_autoscaling_coordinator()
    return description


def disconnect_ray() -> None:
    """Shut down the Ray this process started (an embedded one stops; a cluster is only disconnected)."""
    import ray

    if ray.is_initialized():
        _kill_autoscaler_monitor()
        ray.shutdown()


# Workaround: ray.shutdown() of an embedded Ray stops its processes one after the other, the GCS before the
# autoscaler's monitor. The monitor answers SIGTERM by publishing "the autoscaler failed" through the GCS, which is
# gone by then, so it hangs until Ray kills it a second later (Ray 2.60: _signal_handler in
# ray/autoscaler/_private/monitor.py, Node.kill_all_processes). Killing the monitor first (it holds nothing of a
# local Ray's) takes that second off the end of every command that started its Ray: ray.shutdown() 1.40 -> 0.38 s on
# the 2-core machine. No Ray issue found.
# Delete when: ray.shutdown() of an embedded Ray returns well within a second with the monitor left to it. Check:
# remove the call in disconnect_ray and time ray.shutdown() after ray.init().
def _kill_autoscaler_monitor() -> None:
    """SIGKILL the monitor process of the Ray this process started (nothing when it only connected)."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        processes: list[Any] = [] if node is None else node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        for info in processes:
            info.process.kill()
    except Exception as exc:  # a private API: if it moved, Ray's own shutdown still stops the monitor, slowly
        log.debug("could not stop Ray's autoscaler monitor early: %s", first_line(exc))


def disconnect_in_background(where: str) -> threading.Thread | None:
    """:func:`disconnect_ray` in a thread, for a command whose Ray work is done and whose own work goes on (writing
    its tables and picture: ``sdf-ray reconstruct``, ``mesh``); the caller joins it. Not for a session the command
    found running (``EXISTING_SESSION``): that one stays. An embedded Ray takes seconds to stop (2.3 s on the GPU
    machine), which otherwise follow the command's last line."""
    if where == EXISTING_SESSION:
        return None

    def disconnect() -> None:
        try:
            disconnect_ray()
        except Exception as exc:  # the command's results are written: a failed shutdown is a line, not a traceback
            log.warning("warning: Ray did not shut down cleanly: %s", first_line(exc))

    thread = threading.Thread(target=disconnect, name="ray-shutdown")
    thread.start()
    return thread


# Workaround: Ray Train's autoscaling coordinator starts cold inside the run. The Train controller registers the
# run's resources with the cluster-wide AutoscalingCoordinator actor as soon as it starts
# (``ScalingPolicy.after_controller_start``, ray-project/ray PR #61703, Ray 2.60), creating that detached actor on
# first use (``get_or_create_autoscaling_coordinator`` in ray/data/_internal/cluster_autoscaler/
# default_autoscaling_coordinator.py) and waiting ``AUTOSCALING_REQUESTS_GET_TIMEOUT_S`` = 5 s for its answer
# (the timeout asked for in PR #60721's review). A new actor needs a worker process that imports Ray Data first:
# 4.5 s from creation to its first answer on an idle 2-core machine, more while the controller and the workers
# start beside it. So the first run on a fresh Ray holds its controller up to 5 s and, past that, logs "Failed to
# send resource request ... GetTimeoutError" with a traceback (seen on an H200, and in Tune trials here).
# Creating the actor right after connecting, and waiting for it (generous timeout) just before fit(), overlaps its
# start with the driver's imports; the controller then finds it running (looked up by name). Measured on the
# 2-core machine, tiny run: the controller's first request took 0.2 s instead of 2.6 s. No Ray issue found (Ray
# Data's own client stopped blocking in PR #62725; Train's still blocks).
# Delete when: Ray Train's first resource request no longer blocks on (or times out for) a coordinator that is
# still starting. Check: remove these calls; tests/test_startup.py's no-traceback test must still pass.
COORDINATOR_START_TIMEOUT_S = 60.0


def _autoscaling_coordinator() -> Any:
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    return get_or_create_autoscaling_coordinator()


def start_autoscaling_coordinator() -> None:
    """Create Ray Train's autoscaling coordinator without waiting for it (see the workaround above)."""
    try:
        _autoscaling_coordinator()
    except Exception as exc:  # an upgraded Ray may have moved it: then it is Ray Train's own business again
        log.debug("cannot pre-create Ray Train's autoscaling coordinator: %s", first_line(exc))


def wait_for_autoscaling_coordinator(timeout_s: float = COORDINATOR_START_TIMEOUT_S) -> None:
    """Before a run starts: create the coordinator if needed and wait until it answers (see above)."""
    import ray

    try:
        handle = _autoscaling_coordinator()
    except Exception as exc:
        log.debug("cannot pre-create Ray Train's autoscaling coordinator: %s", first_line(exc))
        return
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
    except Exception as exc:
        log.warning("Ray Train's autoscaling coordinator did not start within %g s (%s); Ray Train may log "
                    "'Failed to send resource request'", timeout_s, first_line(exc))


# Workaround: every process of the job gets ``RAY_ADDRESS`` = this cluster's GCS address (job_env_vars).
# Ray Train's PlacementGroupCleaner (a detached actor) asks the State API whether its controller is alive
# without giving an address (``ray.train.v2._internal.state.util.get_actor``, Ray 2.60). The State API then
# guesses (``/tmp/ray/ray_current_cluster``, then a process scan): with several clusters on one machine it
# fails with "Found multiple active Ray instances" (ray-project/ray#25639, fixed for the CLI by ``--address``,
# not for callers that pass none) and floods the console with "State API may be temporarily unavailable", or
# finds another cluster's API and cleans up a live run's placement group. The State API is served by the
# dashboard, so the embedded Ray keeps it on.
# Delete when: Ray Train's cleaner queries its own cluster (passes an address, or asks the GCS directly);
# then the embedded Ray needs no chosen GCS port either (see _start_embedded_ray).


def _gcs_address(address: str) -> str:
    if address.startswith("http"):
        raise ClusterError(f"--address {address}: give the Ray GCS address (host:6379 or 'auto'); "
                           "dashboard URLs are for `ray job submit`")
    if address != "auto":
        # Workaround: Ray's canonicalisation turns 127.0.0.1 into the host's IP (ray-project/ray#59110, seen
        # there through `ray start --address`; the fix, PR #59206, was closed unmerged), so only "auto" is
        # looked up.
        # Delete when: canonicalize_bootstrap_address keeps loopback addresses; then canonicalise every address.
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return str(canonicalize_bootstrap_address_or_die(address))
    except ConnectionError as exc:
        raise ClusterError(f"cannot find a Ray cluster for address {address!r}: {first_line(exc)}") from None


def _probe(gcs_address: str, timeout_s: float = 3.0) -> None:
    """One line within seconds instead of ``ray.init``'s connection retries when nothing listens."""
    host, _, port = gcs_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError):
        raise ClusterError(f"no Ray cluster is reachable at {gcs_address} (nothing answered within "
                           f"{timeout_s:g} s); check the address, or start one with `ray start --head`") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_embedded_ray(fast_reports: bool) -> str:
    """Start a local Ray on 127.0.0.1 whose GCS address is known before ``ray.init`` (for job_env_vars)."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing:
        log.warning("Ray's dashboard packages are missing (%s): install 'ray[default]'. Without the dashboard "
                    "there is no State API, and Ray Train's placement-group cleaner will log warnings.", missing)
    # Workaround: ray.init() takes no GCS port for the head it starts (only `ray start --port` does), but the
    # job's runtime env must name the address up front; Ray reads RAY_GCS_SERVER_PORT when it starts a head
    # (ray-project/ray PR #15097). Observed on Ray 2.60. The variable is restored at once so that nothing
    # started later inherits it.
    # Delete when: the RAY_ADDRESS workaround above goes, or ray.init takes the port.
    port = _free_port()
    gcs_address = f"127.0.0.1:{port}"
    # Not a workaround, a choice: Ray prestarts one worker process per CPU for the first driver, with an empty
    # runtime env, and holds the driver's registration until they are up (services.py, worker_pool.cc; Ray 2.60).
    # This job's processes all carry env vars (job_env_vars), so none of them could ever be used: on a 16-core
    # machine that was 16 processes importing Ray beside the start-up of the ones the run needs. Measured on the
    # 2-core machine: the driver's connect 0.6 -> 0.05 s; with 16 prestarts simulated, ray.init 11.7 -> 6.9 s.
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=not missing, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, _system_config={"prestart_worker_first_driver": False},
                 runtime_env={"env_vars": job_env_vars(gcs_address, fast_reports=fast_reports)})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return gcs_address


# Workaround: Ray Train's controller imports torch. It unpickles the run's ``TorchConfig``, whose module
# (ray/train/torch/config.py, Ray 2.60) imports torch at its top, and ``_TorchBackend.on_start`` runs in the
# controller; yet all torch work happens in the workers. Measured: a fresh process imports ``ray.train.torch`` in
# 6.9-8.2 s on the H200 machine (torch alone 3.4-4.3 s); fit() -> the training function started took 18.5 s there
# with TorchConfig and 14.6 s with this backend (medians of 5), 10.8 -> 8.4 s on the 2-core machine. This backend
# does what ``_TorchBackend.on_start``/``on_shutdown`` do for Train V2 on GPUs and CPUs (rank 0's address and a
# free port, the torch.distributed environment, ``init_process_group``; the CUDA cache emptied at the end), with
# Ray's own worker-side functions imported where they run. TPU set-up is left out (sdf-ray trains on GPUs/CPUs).
# It also takes two marks for the start-up breakdown (sdf_ray.startup): the worker group up and the process group
# ready; Ray Train has no public hook at those moments. If Ray's private names move, the plain TorchConfig is used
# (torch in the controller again; the breakdown merges those phases into the next one).
# Delete when: Ray Train's torch backend config no longer imports torch where it is unpickled, and reports
# worker-group start-up timings. Check: tests/test_startup.py's controller-import test.


def _init_torch_process_group(addr: str, port: int, backend: str, rank: int, world_size: int,
                              timeout_s: int) -> None:
    """In a Train worker: ``_TorchBackend.on_start``'s worker-side steps (init_method "env")."""
    from sdf_ray.startup import finish_worker_imports

    finish_worker_imports()  # before this thread imports torch (see there)
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()
    _setup_torch_process_group(backend=backend, world_rank=rank, world_size=world_size, init_method="env://",
                               timeout_s=timeout_s)


def _shutdown_torch(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class TorchDeviceContext:
    """Ray's ``TorchConfigContextManager`` (each worker's CUDA device set before the training function),
    imported in the worker when the training function starts."""

    def __enter__(self) -> Any:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)


def train_backend_config(backend: str) -> Any:
    """The torch backend config for Ray Train (``backend``: nccl or gloo) that keeps torch out of the controller
    and marks the worker group up and the process group ready (see the workaround above)."""
    import dataclasses

    try:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train._internal.utils import get_address_and_port
        from ray.train.backend import Backend, BackendConfig
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )
        from ray.train.v2._internal.util import TrainingFramework
    except ImportError:
        from ray.train.torch import TorchConfig

        return TorchConfig(backend=backend)
    from sdf_ray.startup import process_start_time, record_remote_marks

    class TorchBackendOffController(Backend):  # type: ignore[misc, valid-type]
        share_cuda_visible_devices = True

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            started = time.time()
            addr, port = worker_group.execute_single(0, get_address_and_port)
            size = len(worker_group)
            ray.get([worker_group.execute_single_async(rank, _init_torch_process_group, addr, port,
                                                       backend_config.backend, rank, size, backend_config.timeout_s)
                     for rank in range(size)])
            worker_group.execute(record_remote_marks, {"controller_process_started": process_start_time(),
                                                       "worker_group_up": started, "process_group_ready": time.time()},
                                 controller_runtime_env=current_runtime_env_digest())

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            futures = worker_group.execute_async(_shutdown_torch, len(worker_group) > 1)
            timeout_s = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                             DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
            try:
                ray.get(futures, timeout=timeout_s)
            except GetTimeoutError:
                log.warning("torch process group shutdown timed out after %g s", timeout_s)

    @dataclasses.dataclass
    class TorchConfigOffController(BackendConfig):  # type: ignore[misc, valid-type]
        backend: str | None = None
        timeout_s: int = 1800  # Ray's default; the process group is always set up from the environment ("env://")

        @property
        def backend_cls(self) -> type:
            return TorchBackendOffController

        @property
        def train_func_context(self) -> type:
            return TorchDeviceContext

        @property
        def framework(self) -> Any:
            return TrainingFramework.TORCH

        def to_dict(self) -> dict[str, Any]:
            return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}

    return TorchConfigOffController(backend=backend)


# Workaround: Ray's worker-process setup hook for the actors of one run. ``runtime_env["worker_process_setup_hook"]``
# is honoured only in a job's runtime env (``ray.init``); in an actor's it is a no-op field. Ray implements the
# hook as the environment variable ``WORKER_PROCESS_SETUP_HOOK_ENV_VAR``, read by every worker process at start
# (``ray/_private/workers/default_worker.py``, Ray 2.60), so Ray Train's workers get it through their runtime env
# (``RunConfig.worker_runtime_env``). Not job-wide: Ray Train's controller would import torch too (see
# train_backend_config below). A user's job-level hook wins: their workers run theirs, and import as before. A task
# or actor that a Train worker started would inherit the variable (Ray merges env vars down); sdf-ray starts none.
# Delete when: an actor-level runtime env takes ``worker_process_setup_hook``. Check: the hook still runs in a
# Train worker (tests/test_startup.py's healthy run, ``startup_worker_imports_preloaded``).
WORKER_SETUP_HOOKS = {True: "sdf_ray.startup.start_worker_imports", False: "sdf_ray.startup.start_worker_imports_eager"}


def train_worker_runtime_env(compiles: bool) -> dict[str, Any]:
    """The runtime env of sdf-ray's Ray Train workers: they start importing torch (and the compiler if the run
    ``compiles``) as soon as their process starts (:func:`sdf_ray.startup.start_worker_imports`), unless the job
    has a setup hook of its own."""
    import ray
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    # (get_runtime_context() would start a Ray of its own when none is connected.)
    job_env = ((ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}).get("env_vars") or {}
    if WORKER_PROCESS_SETUP_HOOK_ENV_VAR in job_env or os.environ.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR):
        return {}
    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: WORKER_SETUP_HOOKS[compiles]}}


# Workaround: Ray Train starts a run's processes one after another. fit() creates the controller actor, whose
# process Ray starts then (Python, Ray's imports, Ray Train's controller modules); the controller creates the placement
# group and the worker actors, whose processes Ray starts only then; each worker imports torch after that. On an H200
# with bytecode that chain took 4.8 s of the 18 s before a 40-step job's first step (docs/performance.md, session 9).
# The raylet can start processes for a runtime env ahead of need (``NodeManagerService.PrestartWorkers``, the RPC behind
# ``CoreWorker::PrestartWorkers``; Ray 2.60 exposes neither to Python), and a later actor whose runtime env hashes the
# same takes one (worker_pool.cc ``WorkerFitForLease``: same job, same runtime env hash; a prestarted process has no
# GPU or actor flag yet). As soon as the embedded Ray is up (before the autoscaling coordinator, whose creation takes
# the driver 0.6 s), the driver asks for one controller process and one process per Train worker, with the runtime
# envs Ray Train will give them: the workers' setup hook then imports torch while the driver builds the trainer and
# the controller starts. Measured on an H200, 40-step job, warm cache, alternating: first step 12.4-14.7 s with,
# 18.3-20.6 s without (docs/performance.md, session 10). The runtime envs are computed as Ray Train and Ray's core
# worker compute them (``DataParallelTrainer._initialize_and_run_controller``, ``WorkerGroup._get_worker_runtime_env``,
# ``CoreWorker::OverrideTaskOrActorRuntimeEnvInfo``); a process whose hash does not match is never used (the run then
# warns, see cli.cmd_train). One whose hash matches can still be passed over for a fresh process: seen once, for rank 0,
# in CI on the 2-core machine; the run then starts as it would have without, and only summary.json tells
# (``startup_prestarted``). Only for an embedded Ray: its raylet has this driver's environment, so the propagated
# variables are known, and every worker runs on this node. ``SDF_RAY_PRESTART=0`` turns it off.
# Delete when: Ray Train starts its controller and worker processes ahead of need itself, or Ray exposes prestarting
# to Python. Check: tests/test_startup.py's healthy run (``startup_runtime_envs``) fails when the hashes stop matching.
PRESTART_KEEP_ALIVE_S = 120
PRESTART_ENV = "SDF_RAY_PRESTART"


def _train_constants() -> Any:
    """Ray Train's constants module (``ray/train/v2/_internal/constants.py``), read from its file when ``ray.train`` is
    not imported yet: importing that package (pandas, pyarrow) would delay the prestart by 0.5-1 s. The module's
    own imports are two light modules of Ray's core."""
    import importlib.util
    import sys

    import ray

    name = "ray.train.v2._internal.constants"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "_sdf_ray_train_constants", os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "constants.py"))
    if spec is None or spec.loader is None:
        raise ImportError(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _override_runtime_env(child: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """``CoreWorker::OverrideRuntimeEnv``: the child's fields win, except that env vars are merged."""
    merged = dict(parent)
    for key, value in child.items():
        if key == "env_vars" and "env_vars" in merged:
            merged["env_vars"] = {**merged["env_vars"], **value}
        else:
            merged[key] = value
    return merged


def child_runtime_env(parent: str, child: dict[str, Any]) -> str:
    """The serialized runtime env (the string the raylet hashes) of an actor created with ``runtime_env=child`` by
    a process whose runtime env is ``parent`` (serialized): ``CoreWorker::OverrideTaskOrActorRuntimeEnvInfo``. An
    empty child inherits the parent's string as it is; without a parent the child keeps its own (Python's
    ``RuntimeEnv.serialize``); else the two merge and nlohmann's ``dump()`` writes them (sorted keys, no spaces)."""
    from ray.runtime_env import RuntimeEnv

    own = RuntimeEnv(**child).serialize()  # as ``ray.remote(...).options(runtime_env=child)`` carries it
    if own in ("", "{}"):
        return parent
    if parent in ("", "{}"):
        return own
    merged = _override_runtime_env(json.loads(own), json.loads(parent))
    return json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def train_process_runtime_envs(job_env: str, worker_runtime_env: dict[str, Any],
                               environ: dict[str, str]) -> tuple[str, str]:
    """(controller's, workers') serialized runtime envs for a job whose runtime env is ``job_env`` (serialized), whose
    driver and raylet run with ``environ``, and whose run has ``RunConfig.worker_runtime_env`` = ``worker_runtime_env``."""
    constants = _train_constants()

    def propagated(env: dict[str, str]) -> dict[str, str]:  # get_env_vars_to_propagate() in a process with ``env``
        return {k: env[k] for k in constants.ENV_VARS_TO_PROPAGATE if k in env}

    controller_vars = propagated(environ)
    controller_vars.setdefault(constants.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                               constants.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    controller = child_runtime_env(job_env, {"env_vars": controller_vars})
    in_controller = {**environ, **(json.loads(controller).get("env_vars") or {})}  # the controller's os.environ
    worker_child = {**worker_runtime_env,
                    "env_vars": {**propagated(in_controller), **(worker_runtime_env.get("env_vars") or {})}}
    return controller, child_runtime_env(controller, worker_child)


def runtime_env_digest(serialized: str) -> str:
    """A short name for a serialized runtime env (the string the raylet hashes): equal names, same worker pool."""
    return hashlib.sha256((serialized if serialized not in ("", "{}") else "{}").encode()).hexdigest()[:16]


def current_runtime_env_digest() -> str | None:
    """:func:`runtime_env_digest` of this Ray process's runtime env, the one its lease matched (None outside Ray)."""
    try:
        import ray

        worker: Any = ray._private.worker.global_worker
        return runtime_env_digest(worker.core_worker.get_current_runtime_env() or "{}")
    except Exception:  # not a Ray worker, or an upgraded Ray moved it: the summary then leaves it out
        return None


def prestart_train_processes(num_workers: int, worker_runtime_env: dict[str, Any]) -> dict[str, str] | None:
    """Have the embedded Ray start Ray Train's controller process and ``num_workers`` worker processes now (see the
    workaround above). Returns the :func:`runtime_env_digest` of the runtime envs asked for, ``controller`` and
    ``rank0`` (every worker's); None when it did not ask (then Ray starts them when the run needs them, as before)."""
    import ray

    if os.environ.get(PRESTART_ENV, "1") == "0":
        return None
    try:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2

        worker: Any = ray._private.worker.global_worker
        messages: Any = (common_pb2, node_manager_pb2, runtime_environment_pb2)  # generated, without type stubs
        common, node_manager, runtime_environment = messages
        job_env = worker.core_worker.get_current_runtime_env() or "{}"
        controller, workers = train_process_runtime_envs(job_env, worker_runtime_env, dict(os.environ))
        with init_grpc_channel(f"{worker.node.node_ip_address}:{worker.node.node_manager_port}") as channel:
            stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
            for serialized, count in ((controller, 1), (workers, num_workers)):
                stub.PrestartWorkers(node_manager.PrestartWorkersRequest(
                    language=common.PYTHON, job_id=worker.current_job_id.binary(),
                    runtime_env_info=runtime_environment.RuntimeEnvInfo(serialized_runtime_env=serialized),
                    keep_alive_duration_secs=PRESTART_KEEP_ALIVE_S, num_workers=count), timeout=2)
        return {"controller": runtime_env_digest(controller), "rank0": runtime_env_digest(workers)}
    except Exception as exc:  # an upgraded Ray may have moved any of this: the run then starts as before
        log.debug("cannot prestart Ray Train's processes: %s", first_line(exc))
        return None


def quiet_train_report_log() -> None:
    """Silence the INFO line Ray Train V2 logs on every report (the whole metrics dict), on this worker.

    Workaround: that logger is named after its file (``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py``, Ray 2.60), outside the ``ray.train`` hierarchy that
    ``RunConfig(logging_config=LoggingConfig(...))`` controls (ray-project/ray PR #61550). No Ray issue found.
    Delete when: that module logs under ``ray.train`` (``launch.build_trainer``'s LoggingConfig then covers it).
    """
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def tune_trials(results: Any) -> list[Any]:
    """The Tune trials behind a ``ResultGrid``, in its order (``[]`` when Ray does not say).

    Workaround: a ``Result`` carries neither its trial's status (an interrupted sweep's cut-short trials look
    finished) nor, for a trial that failed before its first report, its config; only the grid's private
    ``_experiment_analysis.trials`` has both. Observed on Ray 2.60; no Ray issue found.
    Delete when: ``Result`` or ``ResultGrid`` exposes each trial's status and config.
    """
    analysis = getattr(results, "_experiment_analysis", None)
    return list(getattr(analysis, "trials", None) or [])


def remove_placement_group_by_id(hex_id: str) -> None:
    """Remove a placement group known only by the hex id the State API lists.

    Workaround: Ray has no public way from a placement-group id to a handle that ``remove_placement_group``
    takes (ray-project/ray#28143 asked for removal by id; closed as stale), so the handle is built from
    ``ray._raylet.PlacementGroupID``. Delete when: ``ray.util`` removes (or looks up) a placement group by id.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))
