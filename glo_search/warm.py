"""Warm Ray workers: trial processes started, with torch imported, before the trials.

A trial's first run in a new Ray worker waits for the process to start, for Ray's
runtime environment and for the imports of torch and Ray Tune. That takes 3-5 s on 2
cores, about as long as a 20-epoch trial of the default configuration trains there. Two
settings move that wait ahead of the trials:

- Ray started by glo-search imports ``glo_search.worker`` in every worker process it
  starts (Ray's ``preload_python_modules`` setting), before the worker takes work. That
  imports the trainer and loads the default digits.
- ``warm_workers`` sends this node's raylet a request to start worker processes for the
  trials right away, with the runtime environment that Ray Tune gives its trial actors
  (Tune sets environment variables on them). A worker started without that environment, as
  the raylet's own prestarted workers are, never runs a trial.

NOTE: the raylet's PrestartWorkers call is not part of Ray's public API. It is used as
in Ray 2.60, and a Ray release without it makes ``warm_workers`` start nothing, with a
debug log. The trials then start their own workers as before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

logger = logging.getLogger(__name__)

# The module that Ray workers import at start. It imports torch, Ray Tune and the trainer,
# and loads the default digits (see glo_search.worker).
PRELOAD_MODULES = ("glo_search.worker",)
# Seconds during which the raylet does not stop a warmed worker for being idle. Without
# it, the raylet stops idle workers beyond one per free CPU after about a second, and the
# trials' placement groups take every free CPU before the trial actors arrive. After it,
# an unused worker (about 670 MiB with torch) stays while CPUs are free for it.
KEEP_ALIVE_S = 120
RPC_TIMEOUT_S = 10.0


def preload_system_config() -> dict[str, Any]:
    """Return Ray's ``_system_config`` for a local Ray whose workers import the trainable.

    Ray also starts one worker per CPU when the first driver connects. Those workers
    have no runtime environment, so Tune's trials never run in them, and with the
    preload each would spend seconds of CPU on imports. The setting turns them off.

    NOTE: the preload runs before Ray sets CUDA_VISIBLE_DEVICES for a GPU trial. Importing
    the trainable makes no CUDA call, so the trial should still see only its GPUs, but no
    GPU run has checked it.
    """
    return {
        "preload_python_modules": list(PRELOAD_MODULES),
        "prestart_worker_first_driver": False,
    }


def trial_runtime_env() -> dict[str, Any]:
    """Return the runtime environment that Ray Tune gives a trial actor started now.

    Ray Tune builds it from its default variables and the listed variables set in the
    driver's environment (``ray.tune.execution.class_cache``). A worker is reused for a
    trial only when its runtime environment serializes to the same text, so this follows
    the order in which Tune adds the variables.
    """
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

    env_vars = dict(DEFAULT_ENV_VARS)
    for name in ENV_VARS_TO_PROPAGATE:
        if name in os.environ:
            env_vars[name] = os.environ[name]
    return {"env_vars": env_vars}


def warm_workers(count: int, keep_alive_s: int = KEEP_ALIVE_S) -> int:
    """Start count Ray worker processes on this node for trials that Ray Tune starts next.

    Only sweeps run from this Python process (this Ray job) use them. Call it after
    setting any environment variable that Ray Tune passes to its trials, because the
    workers take the runtime environment of that moment. Ray starts at most one worker
    per CPU of this node at a time, so count is capped at that, and a call made while
    earlier workers are still starting may start fewer. Returns the number of workers
    requested, or 0 when Ray is not running, count < 1, the job has a runtime_env of its
    own, or the raylet call failed (logged at debug level).
    """
    if count < 1 or not ray.is_initialized():
        return 0
    if ray.get_runtime_context().runtime_env:
        # Ray merges the job's runtime_env into each trial's, and in Ray 2.60 workers
        # requested with Tune's variables alone were not used for such trials.
        logger.debug("no warm Ray workers: the Ray job was started with a runtime_env")
        return 0
    try:
        node = _this_node()
        count = min(count, _startup_limit(node))
        _send_prestart(_prestart_request(count, keep_alive_s), _raylet_address(node))
    except Exception as error:  # noqa: BLE001 - a private Ray interface: any failure means no warm workers
        logger.debug("no warm Ray workers: the raylet's PrestartWorkers call failed: %r", error)
        return 0
    return count


def _this_node() -> dict[str, Any]:
    node_id = ray.get_runtime_context().get_node_id()
    return next(node for node in ray.nodes() if node["NodeID"] == node_id)


def _startup_limit(node: dict[str, Any]) -> int:
    """Return how many workers Ray starts at once on a node that glo-search or ray.init started.

    Ray 2.60 sets this limit (``maximum_startup_concurrency``) to the smaller of the
    machine's cores and the node's CPUs, and drops prestart requests above it.
    """
    return max(1, min(os.cpu_count() or 1, int(node["Resources"].get("CPU", 1))))


def _raylet_address(node: dict[str, Any]) -> str:
    return f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"


def _prestart_request(count: int, keep_alive_s: int):
    from ray._private.utils import get_runtime_env_info
    from ray.core.generated import common_pb2, node_manager_pb2
    from ray.runtime_env import RuntimeEnv

    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.Language.Value("PYTHON"),
        job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
        num_workers=count,
        keep_alive_duration_secs=keep_alive_s,
    )
    runtime_env = RuntimeEnv(**trial_runtime_env())
    request.runtime_env_info.CopyFrom(get_runtime_env_info(runtime_env))
    return request


def _send_prestart(request, address: str) -> None:
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2_grpc

    channel = init_grpc_channel(address)  # adds Ray's authentication token when one is set
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            request, timeout=RPC_TIMEOUT_S
        )
    finally:
        channel.close()
