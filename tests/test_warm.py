"""Warm Ray workers: the preload setting, Tune's runtime environment, trials in them."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray import tune

from glo_search.search import ray_init_options
from glo_search.warm import PRELOAD_MODULES, trial_runtime_env, warm_workers


def test_local_ray_preloads_worker():
    config = ray_init_options(None, 2, None)["_system_config"]
    assert config["preload_python_modules"] == ["glo_search.worker"]
    assert config["prestart_worker_first_driver"] is False


def test_cluster_ray_keeps_its_settings():
    assert "_system_config" not in ray_init_options("127.0.0.2:6379", None, None)


def test_preload_modules_import():
    for name in PRELOAD_MODULES:
        __import__(name)


def test_runtime_env_equals_tune_actors(monkeypatch):
    from ray.tune.execution.class_cache import _ActorClassCache

    # A variable that Tune passes on to its trial actors when the driver has it set.
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")

    class Trainable:
        pass

    tune_env = _ActorClassCache().get(Trainable)._default_options["runtime_env"]
    assert trial_runtime_env() == dict(tune_env)
    # Workers match trials by the serialized text, so the variables' order counts too.
    assert list(trial_runtime_env()["env_vars"]) == list(tune_env["env_vars"])
    assert trial_runtime_env()["env_vars"]["RAY_CHDIR_TO_TRIAL_DIR"] == "0"


def test_warm_workers_without_ray():
    code = "from glo_search.warm import warm_workers; print(warm_workers(2))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "0"


JOB_WITH_RUNTIME_ENV = """
import ray
from glo_search.warm import warm_workers
ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"GLO_TEST": "1"}})
print(warm_workers(1))
"""


def test_warm_workers_job_runtime_env():
    output = subprocess.run(
        [sys.executable, "-c", JOB_WITH_RUNTIME_ENV], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip().splitlines()[-1] == "0"


def test_warm_workers_zero_count(ray_session):
    assert warm_workers(0) == 0


def test_warm_workers_failed_call_logged(ray_session, monkeypatch, caplog):
    monkeypatch.setattr(ray, "nodes", list)  # no node: the raylet's address is unknown
    with caplog.at_level(logging.DEBUG, logger="glo_search.warm"):
        assert warm_workers(2) == 0
    assert "PrestartWorkers call failed" in caplog.text


def process_start_time(pid: int) -> float:
    """Return when a Linux process started, in time.time() seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - started_after_boot)


class WorkerStarts(tune.Callback):
    """Record when the process of each trial's first result started."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.starts.setdefault(trial.trial_id, process_start_time(result["pid"]))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads Linux's /proc")
def test_trials_run_in_warm_workers(ray_session, tmp_path):
    from optuna.distributions import CategoricalDistribution

    from glo_search.search import configure_tune_environment, sweep

    configure_tune_environment()
    # Ray starts at most one worker per CPU at a time: the session's Ray has 2 CPUs.
    assert warm_workers(5) == 2
    time.sleep(1.0)  # the raylet starts them after its reply
    sweep_called = time.time()
    starts = WorkerStarts()
    sweep(
        {"class_dim": CategoricalDistribution([5, 8])},
        num_samples=2,
        max_epochs=1,
        max_concurrent=2,
        base_config={"num_images": 100, "swap_sources": 20},
        storage=tmp_path,
        name="warm",
        verbose=0,
        callbacks=[starts],
    )
    assert len(starts.starts) == 2
    # Without warm workers, Ray starts the trials' processes after the sweep call.
    for started in starts.starts.values():
        assert started < sweep_called
