"""A sweep through a real two-node Ray cluster started on this machine.

Both nodes bind to 127.0.0.2, a loopback address: Ray replaces 127.0.0.1 and localhost
by the machine's network address when it connects (Ray 2.60,
``resolve_ip_for_localhost``), and any other 127.x.y.z address keeps the traffic on the
loopback interface. The cluster uses token authentication with a token made for the
test, and a temporary folder of its own, so a later plain ``ray.init()`` cannot find and
join it. The test stops both nodes by process group, then checks that no process that
mentions its folder is left.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys

import pytest
from processes import (
    BIN,
    child_env,
    free_port,
    kill_mentioning,
    run,
    short_temp_dir,
    start,
    stop_group,
    wait_for,
)

from glo_search.results import read_experiment

NODE_IP = "127.0.0.2"

LIST_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
for _ in range(120):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) == 2:
        break
    time.sleep(0.5)
print(json.dumps({n["NodeID"]: sorted(n["Resources"]) for n in nodes}))
"""


def _node_ports() -> list[str]:
    # Two nodes on one machine must not share the per-node ports that Ray fixes by default.
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


@pytest.mark.slow
def test_sweep_runs_on_both_nodes(tmp_path):
    ray_dir = short_temp_dir("glo-ray-")
    port = free_port()
    address = f"{NODE_IP}:{port}"
    env = child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    ray = str(BIN / "ray")
    common = [
        "--block",
        f"--node-ip-address={NODE_IP}",
        f"--temp-dir={ray_dir}",
        "--num-cpus=1",
        "--object-store-memory=100000000",
    ]
    nodes = []
    try:
        nodes.append(
            start(
                [
                    ray,
                    "start",
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}",
                    *common,
                    *_node_ports(),
                ],
                tmp_path / "head.log",
                env,
            )
        )
        wait_for(lambda: (ray_dir / "ray_current_cluster").exists(), 120, "the head node")
        nodes.append(
            start(
                [
                    ray,
                    "start",
                    f"--address={address}",
                    '--resources={"node2": 1}',
                    *common,
                    *_node_ports(),
                ],
                tmp_path / "node2.log",
                env,
            )
        )
        listing = subprocess.run(
            [sys.executable, "-c", LIST_NODES, address],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        cluster = json.loads(listing.stdout.strip().splitlines()[-1])
        assert len(cluster) == 2, listing.stderr[-2000:]
        second = [node for node, resources in cluster.items() if "node2" in resources]
        assert len(second) == 1

        storage = f"file://{tmp_path}/runs"
        sweep = [
            str(BIN / "glo-search"), "sweep", "--address", address, "--storage", storage,
            "--name", "cluster", "--space", "report", "--num-samples", "2",
            "--max-epochs", "2", "--scheduler", "fifo", "--num-images", "100",
            "--swap-sources", "20", "--batch-size", "50",
            # A reused worker could take the second trial before the second node's
            # worker has started, and the check below wants one trial on each node.
            "--no-reuse-workers",
        ]  # fmt: skip
        log = tmp_path / "sweep.log"
        assert run(sweep, log, env, timeout=400) == 0, log.read_text()[-3000:]

        trials, epochs = read_experiment(tmp_path / "runs" / "cluster")
        assert trials.status.tolist() == ["completed", "completed"]
        # Each node has one CPU, so the two trials ran at once, one on each node.
        assert set(epochs.node_id) == set(cluster)
        # The worker's TensorBoard files reach the storage from either node.
        for trial_dir in trials.trial_dir:
            logs = tmp_path / "runs" / "cluster" / trial_dir / "tensorboard"
            assert list(logs.glob("events.out.tfevents.*")), trial_dir
        assert (tmp_path / "runs" / "cluster" / "optuna.db").is_file()
    finally:
        for node in reversed(nodes):
            stop_group(node)
        leftover = kill_mentioning(str(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert not leftover, f"Ray processes outlived `ray start --block`: {leftover}"
