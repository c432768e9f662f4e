"""Helpers for tests against a real control plane: etcd + kube-apiserver + kube-controller-manager (v1.20).

Import from tests in tests/cluster (pytest puts this folder on sys.path): ``from kube import apply, wait_for``.
The ``control_plane`` fixture (conftest.py) yields a :class:`ControlPlane`; everything here also works
directly on a ``kubernetes.client.ApiClient``.

Pods run only on the node of tests/cluster/node.py (a :class:`ControlPlane` with a scheduler and a kubelet).
"""

from __future__ import annotations

import atexit
import base64
import copy
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from ports import free_ports  # noqa: F401  (re-exported: tests take it from here)

log = logging.getLogger("fedfm.tests.kube")

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "testenv"
CRD_DIR = REPO / "charts" / "fedfm" / "crds"
BIN_DIR = Path(os.environ.get("KUBE_BIN_DIR") or Path.home() / ".cache" / "kube-from-debian" / "bin")
ETCD = os.environ.get("KUBE_ETCD", "/usr/bin/etcd")

# A CRD of the harness itself (applied with the chart's when the cluster starts): a namespaced custom
# resource of a group no chart uses, so tests can prove apply() and garbage collection on custom resources
# whether or not charts/fedfm/crds holds any yet.
HARNESS_CRD: dict = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "harnesswidgets.harness.fedfm.test"},
    "spec": {
        "group": "harness.fedfm.test",
        "scope": "Namespaced",
        "names": {"plural": "harnesswidgets", "singular": "harnesswidget", "kind": "HarnessWidget",
                  "listKind": "HarnessWidgetList"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}


# --------------------------------------------------------------------------------------------- polling

def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2,
             message: str | Callable[[], str] = "condition not met", *,
             ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    After ``timeout`` s raise AssertionError with ``message`` (a string, or a callable giving one, for
    diagnostics gathered only on failure). Exceptions of the types in ``ignore`` count as "not yet"
    (the last one is quoted in the failure); any other exception propagates at once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as exc:  # noqa: PERF203
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            if last_exc is not None:
                text += f" (last error: {type(last_exc).__name__}: {last_exc})"
            raise AssertionError(f"timed out after {timeout:g} s: {text}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- clients

def api_client_from_kubeconfig(path: str | os.PathLike, context: str | None = None) -> client.ApiClient:
    """A fresh ApiClient for a kubeconfig file (e.g. one from service_account_kubeconfig)."""
    return config.new_client_from_config(config_file=str(path), context=context, persist_config=False)


_DISCOVERY_DIR: str | None = None
_DYNAMIC: "weakref.WeakKeyDictionary[client.ApiClient, DynamicClient]" = weakref.WeakKeyDictionary()
_DYNAMIC_LOCK = threading.Lock()


def dynamic_client(api: client.ApiClient) -> DynamicClient:
    """The DynamicClient of ``api`` (one per ApiClient; its discovery cache is private to this process)."""
    global _DISCOVERY_DIR
    with _DYNAMIC_LOCK:
        dyn = _DYNAMIC.get(api)
        if dyn is None:
            if _DISCOVERY_DIR is None:
                _DISCOVERY_DIR = tempfile.mkdtemp(prefix="kube-discovery-")
                atexit.register(shutil.rmtree, _DISCOVERY_DIR, True)
            cache = os.path.join(_DISCOVERY_DIR, f"{uuid.uuid4().hex}.json")
            dyn = DynamicClient(api, cache_file=cache)
            _DYNAMIC[api] = dyn
        return dyn


def resource_for(api: client.ApiClient, api_version: str, kind: str, timeout: float = 15.0):
    """The dynamic Resource for apiVersion/kind; waits (refreshing discovery) for a CRD's kind to appear."""
    dyn = dynamic_client(api)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
            dyn.resources.invalidate_cache()


# ------------------------------------------------------------------------------------- apply / delete

def load_manifests(source: str | os.PathLike) -> list[dict]:
    """Every YAML document of a file (a path) or of YAML text, None documents dropped, `kind: List` expanded."""
    text = Path(source).read_text() if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and os.path.exists(source)) else str(source)
    docs: list[dict] = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc.get("kind") == "List" and "items" in doc:
            docs.extend(item for item in doc["items"] if item)
        else:
            docs.append(doc)
    return docs


def _keep_server_fields(kind: str, api_version: str, body: dict, live: dict) -> None:
    """Fields a replace would otherwise reset that the server (or a controller) owns."""
    if api_version == "v1" and kind == "ServiceAccount" and "secrets" not in body and live.get("secrets"):
        body["secrets"] = live["secrets"]  # else the token controller mints another token Secret
    if api_version == "v1" and kind == "Service":
        spec, live_spec = body.setdefault("spec", {}), live.get("spec") or {}
        for key in ("clusterIP", "clusterIPs", "healthCheckNodePort"):
            if key not in spec and key in live_spec:
                spec[key] = live_spec[key]


def apply(api: client.ApiClient, manifest: dict, namespace: str | None = None) -> dict:
    """Create ``manifest`` (any kind: core, RBAC, CRDs, custom resources...) or, if it exists, replace it.

    A namespaced object without metadata.namespace goes to ``namespace`` (default "default"). Replace
    sends the whole manifest with the live resourceVersion (retried on conflicts), so fields the
    manifest leaves out are cleared, as `kubectl replace` would; the status subresource is untouched.
    Returns the resulting object as a dict.
    """
    body = copy.deepcopy(manifest)
    api_version, kind = body["apiVersion"], body["kind"]
    meta = body.setdefault("metadata", {})
    res = resource_for(api, api_version, kind)
    ns = None
    if res.namespaced:
        ns = meta.get("namespace") or namespace or "default"
        meta["namespace"] = ns
    else:
        meta.pop("namespace", None)
    name = meta.get("name")
    meta.pop("resourceVersion", None)
    try:
        return res.create(body=body, namespace=ns).to_dict()
    except DynamicApiError as exc:
        if exc.status != 409 or not name:
            raise
    for attempt in range(10):
        live = res.get(name=name, namespace=ns).to_dict()
        replacement = copy.deepcopy(body)
        replacement["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        _keep_server_fields(kind, api_version, replacement, live)
        try:
            return res.replace(body=replacement, name=name, namespace=ns).to_dict()
        except DynamicApiError as exc:
            if exc.status != 409 or attempt == 9:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def apply_all(api: client.ApiClient, manifests: Iterable[dict] | str | os.PathLike,
              namespace: str | None = None) -> list[dict]:
    """apply() each manifest in order (a list of dicts, or YAML text / a YAML file path)."""
    if isinstance(manifests, (str, os.PathLike)):
        manifests = load_manifests(manifests)
    return [apply(api, m, namespace=namespace) for m in manifests if m]


def delete(api: client.ApiClient, manifest: dict, namespace: str | None = None,
           propagation: str = "Background") -> bool:
    """Delete the object a manifest names; False if it did not exist."""
    meta = manifest.get("metadata") or {}
    res = resource_for(api, manifest["apiVersion"], manifest["kind"])
    ns = (meta.get("namespace") or namespace or "default") if res.namespaced else None
    try:
        res.delete(name=meta["name"], namespace=ns, body={"propagationPolicy": propagation})
        return True
    except DynamicApiError as exc:
        if exc.status == 404:
            return False
        raise


def crd_established(api: client.ApiClient, name: str) -> bool:
    try:
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))


def wait_crds_established(api: client.ApiClient, names: Iterable[str], timeout: float = 30.0) -> None:
    for name in names:
        wait_for(lambda: crd_established(api, name), timeout, message=f"CRD {name} Established")


# ------------------------------------------------------------------------- namespaces, service accounts

def create_namespace(api: client.ApiClient, name: str, labels: dict[str, str] | None = None) -> client.V1Namespace:
    """Create namespace ``name`` if missing (waiting out a previous one still Terminating); ensure ``labels``."""
    core = client.CoreV1Api(api)
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels or None))
    deadline = time.monotonic() + 60
    while True:
        try:
            return core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        try:
            live = core.read_namespace(name)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise
        if live.status and live.status.phase == "Terminating":
            if time.monotonic() > deadline:
                raise AssertionError(f"namespace {name} still Terminating after 60 s")
            time.sleep(0.2)
            continue
        if labels and any((live.metadata.labels or {}).get(k) != v for k, v in labels.items()):
            live = core.patch_namespace(name, {"metadata": {"labels": labels}})
        return live


def service_account_token(api: client.ApiClient, namespace: str, name: str, timeout: float = 30.0) -> str:
    """The token of ServiceAccount NS/NAME from the Secret kube-controller-manager's token controller made."""
    core = client.CoreV1Api(api)

    def token() -> str | None:
        try:
            sa = core.read_namespaced_service_account(name, namespace)
        except ApiException as exc:
            if exc.status == 404:   # the serviceaccount controller has not made `default` yet
                return None
            raise
        secrets = core.list_namespaced_secret(namespace, field_selector="type=kubernetes.io/service-account-token")
        for secret in secrets.items:
            ann = secret.metadata.annotations or {}
            if (ann.get("kubernetes.io/service-account.name") == name
                    and ann.get("kubernetes.io/service-account.uid") == sa.metadata.uid
                    and (secret.data or {}).get("token")):
                return base64.b64decode(secret.data["token"]).decode()
        return None

    return wait_for(token, timeout, 0.2, f"token Secret of ServiceAccount {namespace}/{name} "
                                         "(is kube-controller-manager running?)")


def write_token_kubeconfig(path: str | os.PathLike, server: str, ca_file: str, user: str, token: str,
                           namespace: str | None = None) -> str:
    context: dict = {"cluster": "local", "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return str(path)


def service_account_kubeconfig(control_plane: "ControlPlane", namespace: str, name: str,
                               path: str | os.PathLike) -> str:
    """Create ServiceAccount NS/NAME (and its namespace) if needed, wait (<= 30 s) for its token Secret,
    and write a kubeconfig at ``path`` that authenticates as system:serviceaccount:NS:NAME (subject to
    RBAC like any request). Returns the path."""
    api = control_plane.admin
    create_namespace(api, namespace)
    core = client.CoreV1Api(api)
    try:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    token = service_account_token(api, namespace, name, timeout=30.0)
    return write_token_kubeconfig(path, control_plane.server, control_plane.ca_file,
                                  f"system:serviceaccount:{namespace}:{name}", token, namespace)


# ------------------------------------------------------------------------------------- control plane


def binaries_present(bin_dir: Path = BIN_DIR) -> bool:
    return all(os.access(p, os.X_OK) for p in
               (bin_dir / "kube-apiserver", bin_dir / "kube-controller-manager", Path(ETCD)))


def ensure_binaries(bin_dir: Path = BIN_DIR, say: Callable[[str], None] = print) -> None:
    """Build kube-apiserver/kube-controller-manager (and install etcd) with build-kube.sh unless present."""
    if binaries_present(bin_dir):
        return
    say(f"kube test harness: building kube-apiserver + kube-controller-manager v1.20.2 from Debian sources "
        f"into {bin_dir} and installing etcd (scripts/testenv/build-kube.sh; first run only, takes ~6-7 "
        f"minutes on 2 cores)...")
    started = time.monotonic()
    env = dict(os.environ, BIN_DIR=str(bin_dir))
    proc = subprocess.run([str(SCRIPTS / "build-kube.sh")], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not binaries_present(bin_dir):
        raise RuntimeError(f"build-kube.sh failed (rc {proc.returncode}); its logs are in "
                           f"~/.cache/kube-from-debian/*.log. Output:\n{proc.stdout[-3000:]}")
    say(f"kube test harness: built in {time.monotonic() - started:.0f} s")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclasses.dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager; what the ``control_plane`` fixture yields."""

    run_dir: Path                      # PIDs, logs (etcd.log, apiserver.log, kcm.log), certs/, kubeconfig
    kubeconfig: str                    # admin kubeconfig (contexts "admin" = system:masters, "alice" = no rights)
    server: str                        # https://127.0.0.1:PORT
    ca_file: str                       # CA bundle of the apiserver's serving certificate
    ports: dict[str, int]              # apiserver, etcd, etcd_peer, kcm
    bin_dir: Path = BIN_DIR
    crds: list[str] = dataclasses.field(default_factory=list)   # CRDs applied before the KCM started
    _admin: client.ApiClient | None = dataclasses.field(default=None, repr=False)

    # --- lifecycle -------------------------------------------------------------------------------------
    @classmethod
    def start(cls, run_dir: str | os.PathLike, crds: Iterable[dict] = (), bin_dir: Path = BIN_DIR,
              attempts: int = 3) -> "ControlPlane":
        """Start etcd + apiserver on free ports in ``run_dir``, apply and wait for ``crds``, then start the
        kube-controller-manager and wait until it works. Stops everything again if any step fails."""
        run_dir = Path(run_dir)
        crds = [c for c in crds if c]
        last_error = ""
        for attempt in range(attempts):
            api_port, etcd_port, peer_port, kcm_port = free_ports(4)
            plane = cls(run_dir=run_dir, kubeconfig=str(run_dir / "kubeconfig"),
                        server=f"https://127.0.0.1:{api_port}", ca_file=str(run_dir / "certs" / "apiserver.crt"),
                        ports={"apiserver": api_port, "etcd": etcd_port, "etcd_peer": peer_port, "kcm": kcm_port},
                        bin_dir=Path(bin_dir))
            atexit.register(plane.stop)
            proc = plane._script("start-kube.sh", NO_KCM="1")
            if proc.returncode == 0:
                break
            plane.stop()
            last_error = proc.stdout
            shutil.rmtree(run_dir / "etcd-data", ignore_errors=True)
        else:
            raise RuntimeError(f"could not start etcd + kube-apiserver after {attempts} tries:\n{last_error}\n"
                               f"apiserver.log:\n{_tail(run_dir / 'apiserver.log')}\netcd.log:\n"
                               f"{_tail(run_dir / 'etcd.log')}")
        try:
            api = plane.admin
            for crd in crds:
                apply(api, crd)
            plane.crds = [crd["metadata"]["name"] for crd in crds]
            wait_crds_established(api, plane.crds)
            proc = plane._script("start-kcm.sh")
            if proc.returncode != 0:
                raise RuntimeError(f"start-kcm.sh failed:\n{proc.stdout}\nkcm.log:\n{_tail(run_dir / 'kcm.log')}")
            # Working: the serviceaccount controller made `default` and the token controller its Secret.
            service_account_token(api, "default", "default", timeout=60.0)
        except BaseException:
            plane.stop()
            raise
        return plane

    def _script(self, name: str, **extra: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, RUN=str(self.run_dir), BIN_DIR=str(self.bin_dir), ETCD=ETCD,
                   PORT=str(self.ports["apiserver"]), ETCD_PORT=str(self.ports["etcd"]),
                   ETCD_PEER_PORT=str(self.ports["etcd_peer"]), KCM_PORT=str(self.ports["kcm"]), **extra)
        return subprocess.run([str(SCRIPTS / name)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=180)

    def stop(self) -> None:
        """Stop kube-controller-manager, apiserver and etcd by their PIDs (stop-kube.sh). Idempotent."""
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # noqa: BLE001
                pass
            self._admin = None
        if any((self.run_dir / f"{p}.pid").exists() for p in ("kcm", "apiserver", "etcd")):
            self._script("stop-kube.sh")
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001
            pass

    def log_tail(self, component: str = "apiserver", lines: int = 40) -> str:
        """Last lines of etcd.log / apiserver.log / kcm.log, for failure messages."""
        return _tail(self.run_dir / f"{component}.log", lines)

    # --- clients -----------------------------------------------------------------------------------------
    def api_client(self, context: str = "admin") -> client.ApiClient:
        """A fresh ApiClient: context "admin" (system:masters) or "alice" (group devs, no rights by default)."""
        return api_client_from_kubeconfig(self.kubeconfig, context)

    @property
    def admin(self) -> client.ApiClient:
        """A shared admin ApiClient, used by the helper methods."""
        if self._admin is None:
            self._admin = self.api_client()
        return self._admin

    # --- helpers -----------------------------------------------------------------------------------------
    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> client.V1Namespace:
        return create_namespace(self.admin, name, labels)

    def service_account_kubeconfig(self, namespace: str, name: str, path: str | os.PathLike) -> str:
        return service_account_kubeconfig(self, namespace, name, path)

    def apply(self, manifest: dict, namespace: str | None = None) -> dict:
        return apply(self.admin, manifest, namespace)

    def apply_all(self, manifests: Iterable[dict] | str | os.PathLike, namespace: str | None = None) -> list[dict]:
        return apply_all(self.admin, manifests, namespace)

    def delete(self, manifest: dict, namespace: str | None = None, propagation: str = "Background") -> bool:
        return delete(self.admin, manifest, namespace, propagation)

    wait_for = staticmethod(wait_for)
