"""A real Prometheus and Pushgateway (Debian's) on loopback for the tests, installed by
scripts/testenv/install-prometheus.sh when missing. Prometheus scrapes the given targets every second
and is queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from ports import free_ports

ROOT = Path(__file__).resolve().parents[1]


def ensure_prometheus() -> None:
    if not all(shutil.which(tool) for tool in ("prometheus", "promtool", "prometheus-pushgateway")):
        subprocess.run([str(ROOT / "scripts" / "testenv" / "install-prometheus.sh")], check=True)


class Prometheus:
    """Scrapes job ``fedfm-operator`` every second: the ``targets`` given, or those a file lists
    (``targets_file``: Prometheus's file-based discovery; Debian's build has no Kubernetes discovery)."""

    def __init__(self, run_dir: Path, targets: list[str] | None = None, targets_file: Path | None = None):
        ensure_prometheus()
        self.run_dir, self.port = run_dir, free_ports(1)[0]
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "prometheus.yml"
        discovery = ({"file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}]} if targets_file
                     else {"static_configs": [{"targets": targets}]})
        job = {"job_name": "fedfm-operator", **discovery}
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}))
        subprocess.run(["promtool", "check", "config", str(config)], check=True, capture_output=True)
        self.log = open(run_dir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={run_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict]:
        """The instant vector ``promql`` gives now: ``[{"metric": {...}, "value": [time, "text"]}, ...]``."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict]:
        """Poll until ``promql`` returns a sample; the result."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(promql)
                if result:
                    return result
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus returned nothing for {promql} in {timeout:g} s; "
                                     f"see {self.run_dir / 'prometheus.log'}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Pushgateway:
    """Debian's prometheus-pushgateway on a free loopback port."""

    def __init__(self, run_dir: Path):
        ensure_prometheus()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(run_dir / "pushgateway.log", "w")
        self.process = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{self.port}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.metrics()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the Pushgateway did not start; see {run_dir / 'pushgateway.log'}")
                time.sleep(0.1)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()
