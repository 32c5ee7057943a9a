"""Docker prerequisites for the deploy tests: an engine (installed from Debian's packages and started
when missing), a compose command, a debootstrapped base image, and the Pollen images built on it.

A prerequisite that cannot be met fails the test under CI=true and skips it elsewhere, always with
the reason. A dockerd started here is stopped afterwards; images stay cached for the next run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "pollen-base:bookworm"
IMAGE_TAG = "test"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (a deploy test must not pass silently there), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"deploy prerequisite missing: {reason}", pytrace=False)
    pytest.skip(reason)


def run(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A command's result; a missing program or a timeout becomes exit code 127 with the reason."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 127, "", f"{command[0]}: {exc}")


def _apt_install(*packages: str) -> None:
    """Install Debian packages (as root), or report why that is impossible here."""
    if shutil.which("apt-get") is None:
        unavailable(f"{', '.join(packages)} missing and apt-get is not available to install them")
    if os.geteuid() != 0:
        unavailable(f"{', '.join(packages)} missing and installing them needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = run(["apt-get", "update"], timeout=300, env=env)
    done = run(["apt-get", "install", "-y", "--no-install-recommends", *packages], timeout=900, env=env)
    if update.returncode != 0 or done.returncode != 0:
        unavailable(f"apt-get install {' '.join(packages)} failed: {(update.stderr + done.stderr)[-800:]}")


@dataclass
class DockerEngine:
    compose: list[str]  # "docker compose" (v2) or "docker-compose" (v1.29)
    daemon: subprocess.Popen[bytes] | None = None  # set when this test session started dockerd

    def stop(self) -> None:
        if self.daemon is None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(timeout=10)


def _engine_answers() -> bool:
    return run(["docker", "info"], timeout=20).returncode == 0


def ensure_engine(scratch: Path) -> DockerEngine:
    """A running Docker engine and a compose command."""
    if shutil.which("dockerd") is None:
        _apt_install("docker.io")
    if shutil.which("docker") is None:
        unavailable("the docker client is missing after installing docker.io")
    daemon = None
    if not _engine_answers():
        log = scratch / "dockerd.log"
        with open(log, "wb") as handle:
            daemon = subprocess.Popen(
                ["dockerd", "--iptables=false", "--ip-masq=false"],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                if daemon.poll() is None:
                    daemon.kill()
                unavailable(f"dockerd did not start: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(1)
    if run(["docker", "compose", "version"], timeout=20).returncode == 0:
        compose = ["docker", "compose"]
    else:
        if shutil.which("docker-compose") is None:
            _apt_install("docker-compose")
        compose = ["docker-compose"]
        if run(compose + ["version"], timeout=20).returncode != 0:
            unavailable("neither `docker compose` nor `docker-compose` works")
    return DockerEngine(compose=compose, daemon=daemon)


def ensure_base_image() -> str:
    """A Debian bookworm base with python3, made with debootstrap and `docker import` (cached)."""
    if run(["docker", "image", "inspect", BASE_IMAGE], timeout=30).returncode == 0:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    with tempfile.TemporaryDirectory(prefix="pollen-rootfs-") as rootfs:
        mirror = os.environ.get("POLLEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        done = run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", rootfs, mirror],
            timeout=900,
        )
        if done.returncode != 0:
            unavailable(f"debootstrap failed: {(done.stdout + done.stderr)[-1500:]}")
        shutil.rmtree(Path(rootfs) / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, timeout=600
        )
        tar.wait(timeout=60)
        if imported.returncode != 0:
            unavailable(f"docker import failed: {imported.stderr.decode(errors='replace')[-800:]}")
    return BASE_IMAGE


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    with tempfile.TemporaryDirectory(prefix="pollen-dockerd-") as scratch:
        found = ensure_engine(Path(scratch))
        try:
            yield found
        finally:
            found.stop()


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> str:
    """pollen-superlink:test and pollen:test on the debootstrapped base; Docker caches the layers."""
    base = ensure_base_image()
    bin_dir = str(Path(sys.executable).parent)
    done = run(
        ["bash", str(ROOT / "docker" / "scripts" / "build_images.sh"), "-v", "cpu", "-b", base,
         "-t", IMAGE_TAG, "-p", sys.executable],
        timeout=900,
        env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")},
    )  # fmt: skip
    if done.returncode != 0:  # a broken build is a bug, never a missing prerequisite
        lines = [
            ln for ln in (done.stdout + done.stderr).splitlines() if "is ignored: it is neither" not in ln
        ]
        pytest.fail("building the images failed:\n" + "\n".join(lines[-60:]), pytrace=False)
    return IMAGE_TAG
