"""``fedfm run --runner docker``: each pipeline step in a container of the component image, through
``kfp.local.DockerRunner``, as the Kubeflow cluster would run it, on this machine.

Any Docker engine API serves: Docker's, or podman's (``podman system service``), reached as docker-py finds
it (``DOCKER_HOST``, else ``/var/run/docker.sock``). The container sees the run directory at its own path
(read-write: KFP's outputs, checkpoints, events), and every local file or folder the config names at its own
path (inputs read-only); it runs as the user who runs ``fedfm run``, so what it writes is theirs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedfm.config import FederationConfig
from fedfm.errors import FedFMError

# What a step needs from this environment: the object stores' credentials and endpoints, the Hugging Face
# hub's token and offline switches. Not HF_HOME: the image keeps its caches in its own writable place.
PASSED_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "DS_")
NOT_PASSED = {"HF_HOME", "GOOGLE_APPLICATION_CREDENTIALS"}


def _local_path(value: str | None) -> Path | None:
    """The absolute local path ``value`` names (a plain path or file://), or None (a URI elsewhere, a
    built-in dataset, a hub id)."""
    if not value or value.startswith(("builtin:", "hf:")):
        return None
    if "://" in value:
        if not value.startswith("file://"):
            return None
        value = value[len("file://"):]
    return Path(value).absolute()


def _mounts(cfg: FederationConfig, output: Path) -> dict[Path, bool]:
    """Each local path the steps read or write, with whether they write there (read-only otherwise)."""
    inputs = [cfg.data.source, cfg.model.name_or_path,
              *(value for client in cfg.clients for value in (client.train, client.eval))]
    written = [cfg.execution.storage_uri, cfg.execution.checkpoint_uri, cfg.execution.client_state_uri,
               *(client.state_uri for client in cfg.clients)]
    mounts = {output.absolute(): True}
    for value in written:
        path = _local_path(value)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            mounts[path] = True
    for value in inputs:
        path = _local_path(value)
        if path is not None and path.exists():
            mounts.setdefault(path, False)
    # a path under another mounted one is already there, unless it is written and the other is read-only
    # (then both are mounted; engines mount the shallower path first)
    return {path: writable for path, writable in mounts.items()
            if not any(other in path.parents and (mounts[other] or not writable) for other in mounts)}


def _credentials_file() -> dict[Path, bool]:
    """Google's credentials file, when the environment names one: mounted read-only where it names it."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    return {Path(path).absolute(): False} if path and Path(path).is_file() else {}


def docker_runner(cfg: FederationConfig, output: Path, image: str, environment: dict[str, str]):
    """A ``kfp.local.DockerRunner`` whose containers run ``cfg``'s steps in ``image``, with ``environment``
    (and the credentials of this environment) set. Fails here, with what to do, when no Docker engine
    answers or the image is neither here nor pullable."""
    from kfp import local

    try:
        import docker
        from docker.types import Mount
    except ImportError:
        raise FedFMError("--runner docker needs docker-py: pip install 'kfp-fedfm[docker]'") from None
    try:
        engine = docker.from_env()
        engine.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise FedFMError(f"--runner docker: no Docker engine answers at {where} ({exc}); start Docker, or podman's "
                         "Docker API (podman system service --time=0 unix:///run/podman/podman.sock) and set "
                         "DOCKER_HOST=unix:///run/podman/podman.sock") from None
    try:
        try:
            engine.images.get(image)
        except docker.errors.ImageNotFound:
            try:
                engine.images.pull(image)
            except docker.errors.APIError as exc:
                raise FedFMError(f"--runner docker: image {image} is not here and could not be pulled "
                                 f"({exc.explanation or exc}); build it (make images) and pass --image") from None
    finally:
        engine.close()

    passed = {key: value for key, value in os.environ.items()
              if key.startswith(PASSED_PREFIXES) and key not in NOT_PASSED}
    mounts = {**_mounts(cfg, output), **_credentials_file()}
    run_args: dict[str, Any] = {
        "user": f"{os.getuid()}:{os.getgid()}",
        # relative paths in the config mean what they mean here (each is mounted at its absolute path)
        "working_dir": os.getcwd(),
        "environment": {**passed, **environment, "HOME": "/tmp"},  # any uid may write there
        "mounts": [Mount(target=str(path), source=str(path), type="bind", read_only=not writable)
                   for path, writable in sorted(mounts.items())],
    }
    return local.DockerRunner(**run_args)
