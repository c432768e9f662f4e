"""The real control plane for tests in tests/cluster: etcd + kube-apiserver + kube-controller-manager (v1.20).

``control_plane`` (session): builds the binaries with scripts/testenv/build-kube.sh when they are missing
(a fresh machine: minutes, once), starts etcd + apiserver on free ports in a temp run dir, applies every
CRD in charts/fedfm/crds/*.yaml (plus the harness's own HarnessWidget CRD) and waits until they are
Established, then starts kube-controller-manager (Job controller, garbage collector, token controller...)
and waits until it works. Yields a ``kube.ControlPlane``; stops everything by PID afterwards.
Helpers: ``from kube import apply, wait_for, FakeKubelet, ...`` (this folder is on sys.path).
FEDFM_SKIP_CLUSTER=1 skips these tests instead.
"""

from __future__ import annotations

import os
import uuid

import pytest

from kube import BIN_DIR, CRD_DIR, HARNESS_CRD, ControlPlane, ensure_binaries, load_manifests
from node import Node, prepare


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs the real control plane (kube-apiserver + kube-controller-manager + etcd)")


def _say(request):
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        if capman is None:
            print(text, flush=True)
            return
        with capman.global_and_fixture_disabled():
            print(f"\n{text}", flush=True)
    return say


def chart_crds() -> list[dict]:
    """Every CustomResourceDefinition document in charts/fedfm/crds/*.yaml (none if the folder is missing)."""
    if not CRD_DIR.is_dir():
        return []
    docs: list[dict] = []
    for path in sorted(list(CRD_DIR.glob("*.yaml")) + list(CRD_DIR.glob("*.yml"))):
        docs.extend(d for d in load_manifests(path) if d.get("kind") == "CustomResourceDefinition")
    return docs


@pytest.fixture(scope="session")
def control_plane(request, tmp_path_factory):
    if os.environ.get("FEDFM_SKIP_CLUSTER") == "1":
        pytest.skip("FEDFM_SKIP_CLUSTER=1")
    ensure_binaries(BIN_DIR, _say(request))
    run_dir = tmp_path_factory.mktemp("kube-run")
    plane = ControlPlane.start(run_dir, crds=[*chart_crds(), HARNESS_CRD])
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def node(request):
    """A real one-node cluster (tests/cluster/node.py) with FedFM's images in its containerd: Pods run in
    containers. Started once per session; the first session on a machine builds binaries and images."""
    if os.environ.get("FEDFM_SKIP_CLUSTER") == "1":
        pytest.skip("FEDFM_SKIP_CLUSTER=1")
    if os.geteuid() != 0:
        pytest.skip("a test node (containerd, kubelet, iptables) needs root")
    ensure_binaries(BIN_DIR, _say(request))
    # the component image; the operator's joins when the chart runs from it on the node
    started = Node.start(prepare(_say(request), ("fedfm",)))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def namespace(control_plane, request):
    """A fresh namespace for one test (deleted afterwards, without waiting)."""
    name = f"t-{request.node.name.lower().replace('_', '-')[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    control_plane.create_namespace(name)
    yield name
    try:
        from kubernetes import client
        client.CoreV1Api(control_plane.admin).delete_namespace(name)
    except Exception:  # noqa: BLE001
        pass
