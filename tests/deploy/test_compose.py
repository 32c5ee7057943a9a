"""The shipped compose federation, for real: Docker engine, locally built images, TLS and SuperNode
authentication, a 2-round `flwr run`, the final adapter on the artifacts volume.

The engine comes from Debian's packages when missing; the base image is made with debootstrap and
`docker import` (no registry is reachable). Everything runs on the host network over loopback.
Under CI=true a missing prerequisite fails the test with its reason; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from scripts.flower_run import ROOT, read_metrics, run_config_arg
from tests.deploy.conftest import DockerEngine
from tests.integration.test_deployment import SMALL as DEPLOYMENT_SMALL

pytestmark = pytest.mark.deploy

DOCKER = ROOT / "docker"
COMPOSE_FILES = [
    DOCKER / "compose.yml",
    DOCKER / "compose.tls.yml",
    Path(__file__).with_name("compose.hostnet.yml"),
]
BIN = Path(sys.executable).parent
NODE_UID = 10001  # the containers' user (docker/Dockerfile)

SMALL: dict[str, Any] = {
    **DEPLOYMENT_SMALL,  # the process-deployment test's shrunk run, with a longer round timeout
    "strategy.round-timeout": 180.0,
    "output.dir": "/artifacts/outputs",
    "output.run-name": "compose",
}


def _free_ports(count: int) -> list[int]:
    import socket

    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(int(sock.getsockname()[1]))
    for sock in sockets:
        sock.close()
    return ports


def _run(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def test_compose_federation_with_tls_runs_two_rounds(
    engine: DockerEngine, images: str, tmp_path: Path
) -> None:
    scripts = DOCKER / "scripts"
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    assert (
        _run(["bash", str(scripts / "make_certs.sh"), str(certs), "localhost", "127.0.0.1"], 120).returncode
        == 0
    )
    assert (
        _run(
            ["bash", str(scripts / "make_node_keys.sh"), str(keys), "node-1", "node-2", "node-3"], 60
        ).returncode
        == 0
    )
    data = {n: tmp_path / f"data-{n}" for n in (1, 2, 3)}
    for folder in data.values():
        folder.mkdir()
    rows = [{"instruction": "Add the numbers.", "input": f"{a}+{a}", "output": str(2 * a)} for a in range(40)]
    (data[1] / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (certs, keys, *data.values()):
        for item in [path, *path.rglob("*")]:
            os.chown(item, NODE_UID, NODE_UID)

    fleet, api, *health = _free_ports(2 + 5 + 3)
    node_ports, health = health[5:], health[:5]
    project = f"pollen-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "POLLEN_TAG": images,
        "POLLEN_CERTS": str(certs),
        "POLLEN_KEYS": str(keys),
        "POLLEN_SUPERLINK_HOST": "127.0.0.1",
        "POLLEN_BIND_HOST": "127.0.0.1",
        "POLLEN_FLEET_PORT": str(fleet),
        "POLLEN_API_PORT": str(api),
        "POLLEN_SUPERLINK_HEALTH_PORT": str(health[0]),
        "POLLEN_SERVERAPP_HEALTH_PORT": str(health[1]),
        "POLLEN_NODE_1_CONFIG": "data-path='/data/train.jsonl'",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for n in (1, 2, 3):
        env[f"POLLEN_NODE_{n}_PORT"] = str(node_ports[n - 1])
        env[f"POLLEN_NODE_{n}_HEALTH_PORT"] = str(health[1 + n])
        env[f"POLLEN_NODE_{n}_DATA"] = str(data[n])
    compose = [*engine.compose, "-p", project, "-f", str(_host_network_config(engine, env, tmp_path))]

    try:
        up = _run([*compose, "up", "-d"], timeout=300, env=env)
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}{up.stderr}\n{_logs(compose, env)}"
        added = _run(["bash", str(ROOT / "deploy" / "add_connection.sh"), "compose", f"127.0.0.1:{api}",
                      str(certs / "ca.crt")], 30, env)  # fmt: skip
        assert added.returncode == 0, added.stderr
        _wait_for_nodes(env, 3, timeout=180, logs=lambda: _logs(compose, env))

        started = time.monotonic()
        run = _run(
            [
                str(BIN / "flwr"),
                "run",
                str(ROOT),
                "compose",
                "--stream",
                "--run-config",
                run_config_arg(SMALL),
            ],
            timeout=480,
            env=env,
        )
        output = run.stdout + run.stderr
        print(f"flwr run took {time.monotonic() - started:.0f} s")
        assert "round 2/2 | eval_loss" in output, output[-4000:] + _logs(compose, env)

        volume = f"{project}_artifacts"
        inspect = _run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", volume], 30, env)
        assert inspect.returncode == 0, inspect.stderr
        run_dir = Path(inspect.stdout.strip()) / "outputs" / "compose"
        assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    finally:
        _run([*compose, "down", "-v", "--remove-orphans", "-t", "10"], timeout=180, env=env)


def _host_network_config(engine: DockerEngine, env: dict[str, str], tmp_path: Path) -> Path:
    """The shipped compose files plus the host-network overlay, merged by compose itself.

    Published ports are dropped from the merged file: host networking makes them meaningless and
    compose v1 refuses the combination, while only compose v2 could drop them in an overlay.
    """
    import yaml

    command = list(engine.compose)
    for file in COMPOSE_FILES:
        command += ["-f", str(file)]
    rendered = _run([*command, "config"], timeout=60, env=env)
    assert rendered.returncode == 0, f"compose config failed:\n{rendered.stderr}"
    config = yaml.safe_load(rendered.stdout)
    for service in config["services"].values():
        assert service.get("network_mode") == "host", service
        service.pop("ports", None)
    path = tmp_path / "compose.hostnet.rendered.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait_for_nodes(env: dict[str, str], count: int, timeout: float, logs: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = _run([str(BIN / "flwr"), "supernode", "ls", "compose", "--format", "json"], 60, env)
        try:
            nodes = json.loads(listing.stdout).get("nodes", [])
        except ValueError:
            nodes = []
        if sum(1 for node in nodes if node.get("status") == "online") >= count:
            return
        time.sleep(3)
    pytest.fail(f"{count} SuperNodes were not online within {timeout:.0f} s\n{logs()}")


def _logs(compose: list[str], env: dict[str, str]) -> str:
    done = _run([*compose, "logs", "--no-color", "--tail", "40"], 60, env)
    return (done.stdout + done.stderr)[-6000:]
