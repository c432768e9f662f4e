"""FedFM's images for the tests that run them, built once per machine and code, and podman's Docker API over them.

``build_images`` installs what building needs (scripts/testenv/node/build-node-binaries.sh: podman, mmdebstrap,
and the node's binaries, which the cluster tests need next) and builds the images offline
(scripts/build-images.sh). Two test workers may ask at once (the node's in tests/cluster, the docker runner's
elsewhere): a lock lets one build while the other waits, then finds them built. ``docker_api`` serves the
Docker engine API from the store the images are built in (scripts/testenv/node/podman-api.sh).
Needs root, like the node.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPTS = REPO / "scripts" / "testenv" / "node"
BUILD_IMAGES = REPO / "scripts" / "build-images.sh"
IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", Path.home() / ".cache" / "fedfm-images"))


def printer(request) -> Callable[[str], None]:
    """A function that prints a line to the terminal now, through pytest's output capture (a fixture's news)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        if capman is None:
            print(text, flush=True)
            return
        with capman.global_and_fixture_disabled():
            print(f"\n{text}", flush=True)
    return say


def can_run_containers() -> bool:
    """Root (podman, containerd and the kubelet need it here), unless FEDFM_SKIP_NODE=1 says not to."""
    return os.geteuid() == 0 and os.environ.get("FEDFM_SKIP_NODE") != "1"


def run_script(command: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    proc = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.stdout


def build_images(say: Callable[[str], None], names: tuple[str, ...] = ("fedfm",)) -> dict[str, Path]:
    """Build what building needs and FedFM's images ``names`` (fedfm, fedfm-operator), each once per machine and
    code; return ``{name: tarball}``, docker-archives of the images (``image_name`` gives each one's name)."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(IMAGE_CACHE / ".test-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        run_script([str(NODE_SCRIPTS / "build-node-binaries.sh")], dict(os.environ), 3600, "build-node-binaries.sh")
        output = run_script([str(BUILD_IMAGES), *names], dict(os.environ, OFFLINE="1", ENGINE="podman"), 3600,
                            "scripts/build-images.sh")
    images = {}
    for line in output.splitlines():
        name, _, tarball = line.partition(" ")
        if tarball.endswith(".tar"):
            images[name.rsplit("/", 1)[-1].split(":")[0]] = Path(tarball)
    if set(images) != set(names):
        raise RuntimeError(f"scripts/build-images.sh printed no image tarballs:\n{output[-2000:]}")
    took = time.monotonic() - started
    if took > 30:  # the one-time builds of a new machine (or a wait for the other worker's), printed apart
        say(f"test images: build tools and images {', '.join(names)} ready in {took:.0f} s (built once per "
            "machine and code)")
    return images


def image_name(tarball: Path) -> str:
    """localhost/NAME:HASH from a build-images.sh tarball named NAME-HASH.docker.tar."""
    stem = tarball.name.removesuffix(".docker.tar")
    name, _, digest = stem.rpartition("-")
    return f"localhost/{name}:{digest}"


@contextlib.contextmanager
def docker_api(log: Path) -> Iterator[str]:
    """podman's Docker engine API over the built images, while the block runs: yields its DOCKER_HOST."""
    folder = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))  # a short path: a unix socket (< 108 characters)
    socket = folder / "podman.sock"
    with open(log, "w") as output:
        service = subprocess.Popen([str(NODE_SCRIPTS / "podman-api.sh"), str(socket)], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() and service.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not socket.exists():
            raise RuntimeError(f"podman's API service did not start:\n{log.read_text()[-2000:]}")
        yield f"unix://{socket}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(folder, ignore_errors=True)
