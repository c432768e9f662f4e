"""Tenant Jobs as the operator writes them (fedfm.operators.jobs), run for real: in the component image, on a
real kubelet (containerd + runc), as the tenant's ServiceAccount, with the tenant's data on a read-only
PersistentVolumeClaim and its credentials from its Secret. The hardening is asserted from inside the running
container, and a fine-tune runs there under it."""

from __future__ import annotations

import json
import textwrap
import uuid

import pytest
import yaml
from kubernetes import client

from fedfm.operators.api import TRAIN
from fedfm.operators.jobs import job_manifest
from kube import service_account_token, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Runs in the tenant's container: what the container may and may not do, then a one-round fine-tune of the
# image's packaged model on the tenant's data (Hugging Face and DeepSpeed write their caches under HOME).
PROBE = textwrap.dedent('''
    import errno, json, os, ssl, subprocess, sys, urllib.error, urllib.request
    facts = {"uid": os.getuid(), "gid": os.getgid()}
    def attempt(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return "written"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    facts["write_home"] = attempt("/home/fedfm/probe")      # owned by this uid: only a read-only root stops it
    facts["write_root"] = attempt("/probe")
    facts["write_scratch"] = attempt("/tmp/probe")
    facts["write_data"] = attempt("/data/probe")
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    facts.update(cap_eff=status["CapEff"].strip(), seccomp=status["Seccomp"].strip(),
                 no_new_privs=status["NoNewPrivs"].strip())
    def first(*paths):  # cgroup v2, else v1
        for path in paths:
            try:
                return open(path).read().strip()
            except OSError:
                pass
    facts["memory_limit"] = first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    facts["cpu_quota"] = first("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    facts["threads"] = os.environ.get("OMP_NUM_THREADS")
    facts["store_key"] = os.environ.get("STORE_KEY")
    facts["env_values"] = sorted(os.environ.values())
    facts["mounts"] = [line.split()[4] for line in open("/proc/self/mountinfo")]
    # the Pod's own identity, in-cluster: the API answers it, and refuses it another tenant's Secret
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(f"{sa}/token").read()
    context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
    def get(path):
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        request = urllib.request.Request(f"https://{host}{path}", headers={"Authorization": f"Bearer {token}"})
        try:
            return urllib.request.urlopen(request, context=context, timeout=20).status
        except urllib.error.HTTPError as exc:
            return exc.code
    facts["read_other_secret"] = get(f"/api/v1/namespaces/{os.environ['OTHER_NS']}/secrets/store")
    run = subprocess.run(["fedfm", "simulate", "-c", "/data/federation.yaml", "-o", "/tmp/run"],
                         capture_output=True, text=True)
    facts["simulate_rc"] = run.returncode
    facts["simulate_tail"] = (run.stdout + run.stderr)[-3000:]
    if run.returncode == 0:
        rounds = json.load(open("/tmp/run/metrics.json"))["rounds"]
        facts["accuracy"] = [r["eval"]["global"]["accuracy"] for r in rounds]
    print("PROBE " + json.dumps(facts))
''')


def _tenant(node, name: str, secret_value: str) -> str:
    namespace = f"{name}-{uuid.uuid4().hex[:5]}"
    node.create_namespace(namespace)
    core = client.CoreV1Api(node.admin)
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="store"),
                                                             string_data={"STORE_KEY": secret_value}))
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="fedfm-client")))
    service_account_token(node.admin, namespace, "fedfm-client")  # v1.20 admits Pods once the token exists
    return namespace


def _job(node, namespace: str, command: list[str], deadline: int, env: dict[str, str] | None = None) -> dict:
    """The operator's Job for a training round of client ``a`` in ``namespace``, with ``command`` in place of
    ``fedfm client-train`` (everything else as the operator writes it)."""
    name = f"fed-r1-train-{uuid.uuid4().hex[:5]}"
    client_round = {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
                    "spec": {"federation": {"name": "fed", "namespace": "platform"}, "client": "a", "round": 1,
                             "purpose": TRAIN, "globalAdapterURI": "s3://fed/global.safetensors",
                             "outputURI": "s3://fed/a.safetensors", "config": {"name": "fed"},
                             "deadlineSeconds": deadline}}
    federated_client = {"metadata": {"name": "a", "namespace": namespace},
                        "spec": {"image": node.images["fedfm"], "serviceAccountName": "fedfm-client",
                                 "data": {"pvc": {"claimName": "data", "path": "/train.csv"},
                                          "secretRef": {"name": "store"}},
                                 "resources": {"cpu": "1", "memory": "3Gi"}}}
    job = job_manifest(client_round, federated_client)
    del job["metadata"]["ownerReferences"]  # no ClientRound object here
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = command
    container["imagePullPolicy"] = "Never"  # nothing can be pulled here: the image was loaded into containerd
    container["env"] += [{"name": key, "value": value} for key, value in (env or {}).items()]
    return node.apply(job)


def _job_condition(node, namespace: str, name: str) -> dict | None:
    status = client.BatchV1Api(node.admin).read_namespaced_job_status(name, namespace).status
    for condition in status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return {"type": condition.type, "reason": condition.reason}
    return None


def test_a_tenant_job_runs_hardened_in_the_component_image_and_fine_tunes_there(node, tmp_path):
    tenant, other = _tenant(node, "tenant-a", "a-key-1234"), _tenant(node, "tenant-b", "b-key-5678")
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    rows = ["text,label"] + [f"{w} {w} game score team,sports" for w in ("goal", "match", "cup", "league")] * 6 \
        + [f"{w} market stock price,business" for w in ("bank", "trade", "profit", "sales")] * 6
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    (data / "federation.yaml").write_text(yaml.safe_dump({
        "name": "in-pod", "data": {"source": "/data/train.csv", "eval_fraction": 0.25}, "clients": 1, "rounds": 1,
        "model": {"max_length": 32}, "training": {"local_steps": 2}}))
    for path in data.iterdir():
        path.chmod(0o644)
    node.local_volume(tenant, data)

    job = _job(node, tenant, ["python", "-c", PROBE], deadline=600, env={"OTHER_NS": other})
    name = job["metadata"]["name"]
    outcome = wait_for(lambda: _job_condition(node, tenant, name), timeout=600, interval=2,
                       message=lambda: f"job {name} never finished; kubelet log:\n{node.log_tail()}")
    pods = client.CoreV1Api(node.admin).list_namespaced_pod(tenant, label_selector=f"job-name={name}").items
    log = node.pod_logs(tenant, pods[0].metadata.name)
    assert outcome["type"] == "Complete", log[-3000:]
    facts = json.loads(next(line for line in log.splitlines() if line.startswith("PROBE "))[len("PROBE "):])

    assert pods[0].spec.service_account_name == "fedfm-client"
    assert facts["uid"] != 0 and facts["gid"] != 0
    assert facts["write_home"] == "EROFS" and facts["write_root"] in ("EROFS", "EACCES")  # read-only root
    assert facts["write_scratch"] == "written"
    assert facts["write_data"] == "EROFS"  # the tenant's data is mounted read-only
    assert facts["cap_eff"] == "0000000000000000"  # every capability dropped
    assert facts["seccomp"] == "2" and facts["no_new_privs"] == "1"  # RuntimeDefault filter, no escalation
    assert facts["memory_limit"] == str(3 * 2**30)  # the tenant's resources, enforced by the kernel
    assert facts["cpu_quota"].split()[0] == "100000" and facts["threads"] == "1"  # 1 CPU: one thread
    assert facts["store_key"] == "a-key-1234"  # its own Secret, through envFrom
    assert "b-key-5678" not in facts["env_values"]
    assert not any("secret" in mount and "serviceaccount" not in mount for mount in facts["mounts"])
    assert facts["read_other_secret"] == 403
    assert facts["simulate_rc"] == 0, facts["simulate_tail"]
    assert len(facts["accuracy"]) == 2  # round 0 and the fine-tuned round 1, evaluated in the container


def test_the_job_controller_stops_a_running_tenant_job_at_its_deadline(node, tmp_path):
    tenant = _tenant(node, "tenant-slow", "slow-key")
    tmp_path.chmod(0o755)
    node.local_volume(tenant, tmp_path)
    name = _job(node, tenant, ["sleep", "600"], deadline=8)["metadata"]["name"]
    core = client.CoreV1Api(node.admin)

    def running_pod():
        pods = core.list_namespaced_pod(tenant, label_selector=f"job-name={name}").items
        return pods and pods[0].status.phase == "Running" and pods[0].metadata.name

    pod = wait_for(running_pod, timeout=60, message=lambda: f"the pod never ran; kubelet log:\n{node.log_tail()}")
    outcome = wait_for(lambda: _job_condition(node, tenant, name), timeout=60, interval=1,
                       message=f"job {name} outlived its deadline")
    assert outcome == {"type": "Failed", "reason": "DeadlineExceeded"}

    def stopped():  # the Job controller deletes the Pod; the kubelet kills its container
        pods = core.list_namespaced_pod(tenant, field_selector=f"metadata.name={pod}").items
        return not pods or pods[0].status.phase in ("Failed", "Succeeded")

    wait_for(stopped, timeout=60, message=f"pod {pod} still runs after the deadline")
