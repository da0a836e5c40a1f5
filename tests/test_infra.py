"""infra/: what can be checked without a container engine. The files parse; every SCANONCE_*
variable they set is a real setting (a typo would be silently ignored by the broker); the
configuration reference is not stale; HAProxy accepts its configuration; the image is built
from the same pyproject as every other install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))
SETTINGS = {f"SCANONCE_{name.upper()}" for name in Settings.model_fields}


def _documents() -> list[tuple[Path, Any]]:
    docs = [(INFRA / "compose.yaml", yaml.safe_load((INFRA / "compose.yaml").read_text()))]
    for path in K8S:
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def test_infra_files_parse_and_have_the_expected_parts() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "migrate", "node1", "node2", "worker", "haproxy"} <= set(services)
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["command"] == ["worker"]
    for node in ("node1", "node2"):
        assert services[node]["command"] == ["serve"]
        assert "readyz" in " ".join(services[node]["healthcheck"]["test"])
    assert services["node1"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    kinds: dict[str, list[dict[str, Any]]] = {}
    for path, doc in _documents()[1:]:
        assert {"apiVersion", "kind"} <= set(doc), path
        assert doc["kind"] == "Kustomization" or "metadata" in doc, path
        kinds.setdefault(doc["kind"], []).append(doc)
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret", "Kustomization"} <= set(kinds)
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    node = deployments["scanonce-node"]["spec"]["template"]["spec"]["containers"][0]
    assert node["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker = deployments["scanonce-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"] == ["worker"]
    for container in (node, worker):
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    job = kinds["Job"][0]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["db", "upgrade"]
    listed = {r for d in kinds["Kustomization"] for r in d["resources"]}
    assert listed == {p.name for p in K8S if p.name != "kustomization.yaml"}


def _scanonce_names(text: str) -> set[str]:
    return set(re.findall(r"\bSCANONCE_[A-Z0-9_]+", text))


def test_every_setting_the_infra_names_exists() -> None:
    named: set[str] = set()
    for path in [INFRA / "compose.yaml", INFRA / "Dockerfile", *K8S]:
        named |= _scanonce_names(path.read_text())
    assert named, "the infra files set no SCANONCE_* variable at all?"
    assert named - SETTINGS == set(), "not settings of broker/settings.py (typos are silently ignored)"
    # And the ones production must not leave to their embedded defaults are set.
    compose_env = yaml.safe_load((INFRA / "compose.yaml").read_text())["x-broker"]["environment"]
    for required in ("SCANONCE_DATABASE_URL", "SCANONCE_STORAGE_URL", "SCANONCE_AUTH_SIGNING_KEY_FILE"):
        assert required in compose_env


def test_the_configuration_reference_is_not_stale() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`SCANONCE_{name.upper()}`" in text
        assert field.description, f"{name} has no description="


def test_haproxy_accepts_its_configuration() -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed (scripts/test installs the Debian package)")
    done = subprocess.run(
        [haproxy, "-c", "-f", str(INFRA / "haproxy.cfg")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr
    cfg = (INFRA / "haproxy.cfg").read_text()
    assert "http-check send meth GET uri /readyz" in cfg


def test_the_image_installs_the_project_from_its_pyproject() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "COPY pyproject.toml" in dockerfile and "pip install" in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.M)  # not root
    assert 'ENTRYPOINT ["scanonce"]' in dockerfile
    # Every package the pyproject installs is copied into the build.
    for package in ("broker", "storage"):
        assert f"COPY {package} ./{package}" in dockerfile
