"""The package layout users and operators rely on."""

from __future__ import annotations

import subprocess
import sys

CORE = ["adapters", "cli", "config", "data", "evaluation", "events", "executors", "federation",
        "modeling", "pushgateway", "report", "server_state", "storage", "strategies", "tasks", "training",
        "trust.admission", "trust.privacy", "trust.secagg", "trust.secure_round", "trust.signing",
        "trust.update_checks"]


def test_the_core_imports_neither_kfp_nor_kubernetes():
    """fedfm/ is tensors in, tensors out: KFP and Kubernetes stay in components/, pipelines/, operators/."""
    code = ("import sys\n" + "".join(f"import fedfm.{module}\n" for module in CORE)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'kubernetes')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_top_level_folders_are_subpackages_of_fedfm():
    import fedfm.components
    import fedfm.operators
    import fedfm.pipelines

    for package, folder in ((fedfm.components, "components"), (fedfm.pipelines, "pipelines"),
                            (fedfm.operators, "operators")):
        assert package.__file__.replace("\\", "/").endswith(f"/{folder}/__init__.py")
