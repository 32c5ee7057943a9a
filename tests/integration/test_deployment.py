"""The process deployment of docs/DEPLOYMENT.md on loopback: a real `flower-superlink` with TLS and
SuperNode authentication, three authenticated `flower-supernode` processes with their own node
configs, and `flwr run .` against them. Every process is started in its own session and its whole
tree is ended afterwards; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from scripts.flower_run import ROOT, read_metrics, run_config_arg

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "deploy"
SCRIPTS = ROOT / "docker" / "scripts"
BIN = Path(sys.executable).parent
NODES = ("inst-a", "inst-b", "inst-c")
CONNECTION = "pollen-test"

# The shipped configuration shrunk: 2 rounds, a few steps, no federated evaluation (each message
# starts a ClientApp process, which dominates the time on a loaded 2-core machine).
SMALL: dict[str, Any] = {
    "num-server-rounds": 2,
    "train.local-steps": 2,
    "train.batch-size": 8,
    "task.num-train": 300,
    "task.num-eval": 16,
    "task.max-new-tokens": 4,
    "strategy.fraction-train": 1.0,
    "strategy.fraction-evaluate": 0.0,
    "strategy.min-nodes": 3,
    "strategy.round-timeout": 120.0,
}


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``predicate`` once a second for at most ``timeout`` seconds; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def end_tree(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """SIGTERM a process and every descendant (Flower detaches its SuperExec), then SIGKILL stragglers."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Federation:
    """One SuperLink and its SuperNodes under ``root``; knows how to start, stop and reach them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.keys = root / "keys"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.fleet_port = free_port()
        self.api_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(root / "flwr-home"),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PATH=str(BIN) + os.pathsep + self.env.get("PATH", ""),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",  # two nodes and the ServerApp share the cores (docs/DEPLOYMENT.md 2.4)
        )
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self._handles: list[IO[Any]] = []
        self.node_ports: dict[str, int] = {}
        self.node_configs: dict[str, str] = {}

    # ---- processes ---------------------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[Any]:
        handle = open(self.log(name), "a")  # closed in stop_all
        self._handles.append(handle)
        proc = subprocess.Popen(
            command,
            cwd=self.root,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            end_tree(proc)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for handle in self._handles:
            handle.close()

    def start_superlink(self) -> None:
        self.spawn(
            "superlink",
            [
                "bash",
                str(DEPLOY / "start_superlink.sh"),
                "-c", str(self.certs),
                "-d", str(self.root / "state"),
                "-f", f"127.0.0.1:{self.fleet_port}",
                "-H", "127.0.0.1",
                "-p", str(self.api_port),
            ],
        )  # fmt: skip
        wait_for(
            lambda: "Uvicorn running on https" in self.log("superlink").read_text(errors="replace"),
            90,
            "the SuperLink to serve its HTTPS API",
            self.log("superlink"),
        )

    def start_node(self, name: str, node_config: str, key: str | None = None) -> subprocess.Popen[Any]:
        port = self.node_ports.setdefault(name, free_port())
        return self.spawn(
            name,
            [
                "bash",
                str(DEPLOY / "start_supernode.sh"),
                "-s", f"127.0.0.1:{self.fleet_port}",
                "-r", str(self.certs / "ca.crt"),
                "-k", str(self.keys / (key or name)),
                "-p", str(port),
                "-n", node_config,
            ],
        )  # fmt: skip

    # ---- flwr CLI ----------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def online_nodes(self) -> int:
        listing = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(listing.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def start_run(self, overrides: dict[str, Any], name: str) -> subprocess.Popen[Any]:
        """`flwr run . <connection> --stream` from the repository, in the background."""
        command = [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream"]
        command += ["--run-config", run_config_arg(overrides)]
        return self.spawn(name, command)

    def finish_run(self, name: str, timeout: float) -> str:
        """Wait (bounded) for a background `flwr run` to end; its output."""
        proc = self.procs[name]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(name)
            pytest.fail(f"`flwr run` ({name}) did not finish within {timeout:.0f} s\n{self.tail(name)}")
        self.procs.pop(name)
        return self.log(name).read_text(errors="replace")

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _write_institution_data(path: Path) -> None:
    """An institution's own Alpaca-style JSONL file (what `data-path` points at)."""
    rows = [
        {"instruction": "Add the numbers.", "input": f"{a}+{a + 3}", "output": str(2 * a + 3)}
        for a in range(40)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """SuperLink (TLS, node authentication, database) + 3 registered SuperNodes with their own configs."""
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        for script, args in (
            ("make_certs.sh", [str(fed.certs), "localhost", "127.0.0.1"]),
            ("make_node_keys.sh", [str(fed.keys), *NODES, "rogue"]),
            ("add_connection.sh", [CONNECTION, f"127.0.0.1:{fed.api_port}", str(fed.certs / "ca.crt")]),
        ):
            done = subprocess.run(
                ["bash", str(SCRIPTS / script if script.startswith("make") else DEPLOY / script), *args],
                env=fed.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"{script} failed:\n{done.stdout}{done.stderr}"
        fed.start_superlink()
        for name in NODES:
            done = fed.flwr("supernode", "register", str(fed.keys / f"{name}.pub"), CONNECTION)
            assert "registered successfully" in done.stdout, done.stdout + done.stderr
        _write_institution_data(fed.root / "inst-a.jsonl")
        fed.node_configs = {
            "inst-a": f"data-path='{fed.root / 'inst-a.jsonl'}' lora-rank=8",
            "inst-b": "partition-id=1 num-partitions=3",
            "inst-c": "partition-id=2 num-partitions=3",
        }
        for name in NODES:
            fed.start_node(name, fed.node_configs[name])
        wait_for(lambda: fed.online_nodes() == 3, 120, "3 SuperNodes online", fed.log("inst-c"))
        yield fed
    finally:
        fed.stop_all()


def _overrides(fed: Federation, run_name: str, **extra: Any) -> dict[str, Any]:
    out = {**SMALL, "output.dir": str(fed.root / "out"), "output.run-name": run_name}
    out.update(extra)
    return out


def test_tls_authenticated_run_completes_two_rounds(federation: Federation) -> None:
    fed = federation
    fed.start_run(_overrides(fed, "tls"), "run-tls")
    output = fed.finish_run("run-tls", timeout=420)
    run_dir = fed.root / "out" / "tls"
    assert (run_dir / "metrics.jsonl").is_file(), output[-4000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["nodes_sent"] == 3 and r["nodes_accepted"] == 3 for r in rows), rows
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "round 2/2 | eval_loss" in output
    assert "Using SuperLink: " + CONNECTION in output


def test_unregistered_node_is_refused(federation: Federation) -> None:
    fed = federation
    proc = fed.start_node("rogue", "partition-id=0 num-partitions=3")
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused within 90 s\n{fed.tail('rogue')}")
    finally:
        fed.stop("rogue")
    node_log = fed.log("rogue").read_text(errors="replace")
    assert code != 0
    assert "Failed to activate SuperNode" in node_log, node_log[-3000:]
    assert "No SuperNode found with the given public key" in fed.log("superlink").read_text(errors="replace")
    assert fed.online_nodes() == 3


def test_node_killed_mid_round_does_not_stop_the_run(federation: Federation) -> None:
    fed = federation
    # The round ends when the two live nodes have replied and the SuperLink has answered for the dead
    # one (after its heartbeats stop), at the latest after round-timeout seconds.
    timeout = 120.0
    overrides = _overrides(fed, "killed", **{"strategy.min-nodes": 2, "strategy.round-timeout": timeout})
    victim_log = fed.log("inst-c")
    trains_before = victim_log.read_text(errors="replace").count("Receiving: train message")
    fed.start_run(overrides, "run-killed")
    wait_for(
        lambda: victim_log.read_text(errors="replace").count("Receiving: train message") > trains_before,
        240,
        "inst-c to receive its round-1 train message",
        fed.log("run-killed"),
    )
    fed.stop("inst-c")  # the node and its ClientApp, in the middle of training
    try:
        output = fed.finish_run("run-killed", timeout=360)
    finally:
        fed.start_node("inst-c", fed.node_configs["inst-c"])
    rows = read_metrics(fed.root / "out" / "killed")
    assert [r["round"] for r in rows] == [1, 2], output[-4000:]
    assert rows[0]["nodes_sent"] == 3 and rows[0]["nodes_accepted"] == 2, rows[0]
    assert rows[0]["round_seconds"] < timeout + 90.0  # bounded by the timeout (+ server-side evaluation)
    assert (fed.root / "out" / "killed" / "adapter" / "adapter_model.safetensors").is_file()
    wait_for(lambda: fed.online_nodes() == 3, 120, "inst-c to rejoin", victim_log)


def test_serverapp_resumes_from_its_checkpoint(federation: Federation) -> None:
    """The SuperLink (with its ServerApp) is stopped after round 1 and restarted on the same database;
    the registered nodes reconnect by themselves and a run with output.resume=true does round 2 only."""
    fed = federation
    run_dir = fed.root / "out" / "resumed"
    fed.start_run(_overrides(fed, "resumed"), "run-first")
    wait_for(
        lambda: (run_dir / "checkpoint" / "checkpoint.json").is_file(),
        300,
        "the checkpoint of round 1",
        fed.log("run-first"),
    )
    fed.stop("superlink")  # ends the SuperLink, its SuperExec and the running ServerApp
    fed.stop("run-first")
    done_rounds = [r["round"] for r in read_metrics(run_dir)]
    assert done_rounds == [1], f"expected to stop after round 1, the run got to {done_rounds}"

    fed.start_superlink()
    wait_for(lambda: fed.online_nodes() == 3, 150, "the registered nodes to reconnect", fed.log("superlink"))
    fed.start_run(_overrides(fed, "resumed", **{"output.resume": True}), "run-resume")
    output = fed.finish_run("run-resume", timeout=360)
    assert "resuming" in output and "after round 1" in output, output[-4000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2], output[-4000:]
    assert "round 1/2" not in output and "round 2/2 | eval_loss" in output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert re.search(r"Successfully started run \d+", output)
