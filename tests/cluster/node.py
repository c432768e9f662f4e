"""A real one-node cluster for the tests whose Pods must really run: containerd + runc, etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and a kubelet (scripts/testenv/node, v1.20.2 from Debian's sources),
with FedFM's images built offline (scripts/build-images.sh) and loaded into the node's containerd.

``Node`` is a :class:`kube.ControlPlane` (same clients and helpers) whose Pods run in containers: ServiceAccount
token mounts, Secrets, PersistentVolumes, security contexts and the Job controller's deadlines are the real
ones. One node per machine at a time (the kubelet's ports are fixed); ``node`` in conftest.py starts it once
per session. Needs root, overlayfs and Debian's archive; the first start on a machine builds the binaries and
images (minutes), later ones reuse ~/.cache/kube-from-debian and ~/.cache/fedfm-images.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from kubernetes import client

from images import NODE_SCRIPTS, image_name, run_script
from kube import ControlPlane, _tail, apply, free_ports, service_account_token, wait_crds_established, wait_for

@dataclasses.dataclass
class Node(ControlPlane):
    """A running one-node cluster (start-node.sh); ``run_dir`` is its ``$WORK``."""

    images: dict[str, str] = dataclasses.field(default_factory=dict)   # fedfm, fedfm-operator -> image name

    @classmethod
    def start(cls, images: dict[str, Path] | None = None, crds: list[dict] = ()) -> "Node":  # type: ignore[override]
        """Start the node, load ``images`` (``{name: tarball}`` from ``images.build_images``) into its containerd and
        apply ``crds`` (the garbage collector finds them at its next discovery, within 30 s)."""
        # a short path: containerd's and the kubelet's unix sockets live under it (< 108 characters)
        work = Path(tempfile.mkdtemp(prefix="fn", dir="/tmp"))
        api, etcd, peer, kcm, scheduler = free_ports(5)
        node = cls(run_dir=work, kubeconfig=str(work / "kubeconfig"), server=f"https://127.0.0.1:{api}",
                   ca_file=str(work / "pki" / "ca.crt"),
                   ports={"apiserver": api, "etcd": etcd, "etcd_peer": peer, "kcm": kcm, "scheduler": scheduler})
        atexit.register(node.stop)
        try:
            run_script([str(NODE_SCRIPTS / "make-base-images.sh")], node._env(), 600, "make-base-images.sh")
            run_script([str(NODE_SCRIPTS / "start-node.sh")], node._env(), 300, "start-node.sh")
            for name, tarball in (images or {}).items():
                node.images[name] = image_name(tarball)
                run_script([str(NODE_SCRIPTS / "load-image.sh"), str(tarball), node.images[name]], node._env(), 600,
                     f"loading {tarball}")
            for crd in crds:
                apply(node.admin, crd)
            node.crds = [crd["metadata"]["name"] for crd in crds]
            wait_crds_established(node.admin, node.crds)
            service_account_token(node.admin, "default", "default", timeout=60.0)
        except BaseException as exc:
            logs = "\n".join(f"--- {name}.log\n{_tail(work / 'log' / f'{name}.log', 15)}"
                             for name in ("containerd", "kube-apiserver", "kubelet"))
            node.stop()
            raise RuntimeError(f"the test node did not start: {exc}\n{logs}") from exc
        return node

    def _env(self) -> dict[str, str]:
        return dict(os.environ, WORK=str(self.run_dir), API_PORT=str(self.ports["apiserver"]),
                    ETCD_PORT=str(self.ports["etcd"]), ETCD_PEER_PORT=str(self.ports["etcd_peer"]),
                    KCM_PORT=str(self.ports["kcm"]), SCHED_PORT=str(self.ports["scheduler"]))

    def stop(self) -> None:
        """Stop the node and remove what it left on the host (stop-node.sh), then its ``$WORK``. Idempotent."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.run_dir.exists():
            subprocess.run([str(NODE_SCRIPTS / "stop-node.sh")], env=self._env(), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def _setting(self, key: str) -> str:
        """A value start-node.sh used, as it recorded it in ``$WORK/node.env``."""
        for line in (self.run_dir / "node.env").read_text().splitlines():
            if line.startswith(f"{key}="):
                return line.partition("=")[2].strip("'\"")
        raise RuntimeError(f"no {key} in {self.run_dir / 'node.env'}")

    @property
    def name(self) -> str:
        return self._setting("NODE_NAME")

    @property
    def ip(self) -> str:
        """The host's address, where Pods reach the host's servers (and the apiserver)."""
        return self._setting("NODE_IP")

    def local_volume(self, namespace: str, directory: Path, claim: str = "data") -> None:
        """``directory`` on this machine as a local PersistentVolume of the node, bound to the claim ``claim``
        in ``namespace`` (read-only many); returns once the claim is Bound."""
        name = f"{claim}-{namespace}"
        self.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                    "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                             "storageClassName": "tenant-local", "local": {"path": str(directory)},
                             "claimRef": {"namespace": namespace, "name": claim},
                             "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                                 {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.name]}]}]}}}})
        self.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": claim, "namespace": namespace},
                    "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "tenant-local", "volumeName": name,
                             "resources": {"requests": {"storage": "1Gi"}}}})
        core = client.CoreV1Api(self.admin)

        def bound() -> bool:
            # The PV controller binds a claim when it sees it, if it has seen the volume by then; if not, only at
            # its next resync of every claim (15 s). A change to the claim makes it look again at once.
            if core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase == "Bound":
                return True
            core.patch_namespaced_persistent_volume_claim(claim, namespace, {"metadata": {"annotations": {
                "fedfm.dev/test-binding-check": str(time.monotonic_ns())}}})
            return False

        wait_for(bound, timeout=60, interval=0.5, message=f"the claim {namespace}/{claim} never bound")

    def log_tail(self, component: str = "kubelet", lines: int = 40) -> str:
        return _tail(self.run_dir / "log" / f"{component}.log", lines)

    def pod_logs(self, namespace: str, name: str) -> str:
        """What the Pod's container printed, through the kubelet (``kubectl logs``)."""
        return client.CoreV1Api(self.admin).read_namespaced_pod_log(name, namespace)

