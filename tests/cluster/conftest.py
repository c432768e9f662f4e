"""The real cluster for tests in tests/cluster, one per session: a node (kube-apiserver, controller-manager,
scheduler, kubelet, containerd; v1.20) whose Pods run in FedFM's images.

``control_plane`` (session): builds the binaries (scripts/testenv/build-kube.sh, scripts/testenv/node) and
FedFM's two images when they are missing (a fresh machine: minutes, once), starts the node, applies every
CRD in charts/fedfm/crds/*.yaml (plus the harness's own HarnessWidget CRD) and waits until they are
Established. Yields a ``node.Node`` (a ``kube.ControlPlane``); stops everything afterwards. Without root it
is a control plane with no kubelet, and ``node`` skips the tests that need Pods to run.
``trainer`` (session): Kubeflow Trainer's controller played (trainer_harness.py); ``trainer.install()``
installs its CRDs and starts it.
Helpers: ``from kube import apply, wait_for, ...`` (this folder is on sys.path).
FEDFM_SKIP_CLUSTER=1 skips these tests instead.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from images import build_images, can_run_containers, printer
from kube import BIN_DIR, CRD_DIR, HARNESS_CRD, ControlPlane, ensure_binaries, load_manifests
from node import Node


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs the real control plane (kube-apiserver + kube-controller-manager + etcd)")


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
    """The session's one cluster: a real node (tests/cluster/node.py: Pods run in containers) where this
    process may run one (root), else etcd + kube-apiserver + kube-controller-manager alone, where the tests
    that need Pods to run skip. FEDFM_SKIP_NODE=1 asks for the latter; FEDFM_SKIP_CLUSTER=1 skips both."""
    if os.environ.get("FEDFM_SKIP_CLUSTER") == "1":
        pytest.skip("FEDFM_SKIP_CLUSTER=1")
    say = printer(request)
    ensure_binaries(BIN_DIR, say)
    crds = [*chart_crds(), HARNESS_CRD]
    if can_run_containers():
        started = time.monotonic()
        # the component image (tenants' Jobs) and the operator's (the chart runs it)
        plane = Node.start(build_images(say, ("fedfm", "fedfm-operator")), crds=crds)
        say(f"test node ready in {time.monotonic() - started:.0f} s")
    else:
        plane = ControlPlane.start(tmp_path_factory.mktemp("kube-run"), crds=crds)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def node(control_plane):
    """The session's cluster where its Pods really run (skips where it cannot be a node: not root)."""
    if not isinstance(control_plane, Node):
        pytest.skip("a test node (containerd, kubelet, iptables) needs root" if os.geteuid() != 0
                    else "FEDFM_SKIP_NODE=1")
    return control_plane


@pytest.fixture(scope="session")
def trainer(control_plane):
    """Kubeflow Trainer v2 for the session's cluster, played by tests/cluster/trainer_harness.py: a
    ``TrainerController`` for all namespaces, not started; ``trainer.install()`` installs Trainer's CRDs
    (from ../shared/vendor/kubeflow-trainer, stripped for v1.20) and starts it (idempotent), so that a test
    may first see the cluster without Trainer. It turns TrainJobs into node Pods (which run only where the
    cluster is a ``node``) until the session ends. Skips where the vendored files are missing."""
    from trainer_harness import VENDOR, TrainerController
    if not (VENDOR / "crds").is_dir():
        pytest.skip(f"Kubeflow Trainer's CRDs are not at {VENDOR}/crds")
    controller = TrainerController(control_plane)
    try:
        yield controller
    finally:
        controller.stop()


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
