"""deploy/k8s/: the kustomize base and overlay render with ``kubectl kustomize``, every object
(and the Secrets made from a provisioned fleet as deploy/k8s/README.md says) validates
against the Kubernetes OpenAPI schemas in strict mode, and the objects agree with what
provisioning writes. No cluster is reachable here: applying them is not tested (the
README says so)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.broker_coordinator.provision.conftest import provision

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed (Debian: apt-get install kubernetes-client; "
    "make test and .ci/run install it)",
)

Obj = dict[str, Any]


def kubectl(*args: str) -> str:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    # newer kubectl warns about the fields kept for kubectl 1.20; nothing else is expected
    for line in done.stderr.splitlines():
        assert re.match(r"# Warning: '(bases|patchesStrategicMerge)' is deprecated", line), line
    return done.stdout


def render(folder: str) -> list[Obj]:
    return [o for o in yaml.safe_load_all(kubectl("kustomize", str(K8S / folder))) if o]


def validate(obj: Obj) -> None:
    """Raise unless ``obj`` is valid for Kubernetes KUBE_VERSION (unknown fields too)."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def by_kind(objs: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def container(sts: Obj, name: str, *, init: bool = False) -> Obj:
    key = "initContainers" if init else "containers"
    found: list[Obj] = [c for c in sts["spec"]["template"]["spec"][key] if c["name"] == name]
    assert len(found) == 1
    return found[0]


@needs_kubectl
@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_manifests_render_and_validate_strictly(folder: str) -> None:
    objs = render(folder)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("StatefulSet") == 2 and kinds.count("Service") >= 2
    for obj in objs:
        validate(obj)


def test_the_schema_check_rejects_what_kubernetes_would() -> None:
    """The validator really checks: a misspelt field, a wrong type, a missing field."""
    good: Obj = yaml.safe_load((K8S / "base" / "coordinator.yaml").read_text().split("---")[1])
    validate(good)
    misspelt = copy.deepcopy(good)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "one"
    missing = copy.deepcopy(good)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    for bad in (misspelt, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(bad)


@needs_kubectl
def test_overlay_fits_what_provisioning_writes(tmp_path: Path) -> None:  # noqa: PLR0915 checks every file provisioning writes
    fleet = tmp_path / "fleet"
    provision(fleet, "init", "--fleet", "k8s", "--host", "mqtt.example.org")
    provision(fleet, "add-device", "pi", "--count", "2")
    objs = by_kind(render("overlays/example"))
    assert all(o["metadata"].get("namespace", "maskfl") == "maskfl" for o in objs.values())

    # the Secrets, made exactly as deploy/k8s/README.md says, validate and fit
    secrets: dict[str, Obj] = {}
    for name, folder in (("maskfl-broker", "broker"), ("maskfl-coordinator", "coordinator")):
        made = kubectl(
            "-n", "maskfl", "create", "secret", "generic", name,
            f"--from-file={fleet / folder}/", "--dry-run=client", "-o", "yaml",
        )  # fmt: skip
        secret: Obj = yaml.safe_load(made)
        validate(secret)
        assert set(secret["data"]) == {p.name for p in (fleet / folder).iterdir() if p.is_file()}
        assert len(made) < 1024 * 1024  # a Secret holds at most 1 MiB
        secrets[name] = secret
    assert "ca.key" not in str(secrets) and "fleet-ca.key" not in str(secrets)

    # mosquitto: its config Secret at the folder mosquitto.conf names, a volume for data
    mosquitto = objs[("StatefulSet", "mosquitto")]
    assert mosquitto["spec"]["replicas"] == 1
    broker = container(mosquitto, "mosquitto")
    mounts = {m["mountPath"]: m["name"] for m in broker["volumeMounts"]}
    conf = (fleet / "broker" / "mosquitto.conf").read_text()
    for key in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        path = Path(re.search(rf"^{key} (\S+)$", conf, re.M).group(1))  # type: ignore[union-attr]
        assert mounts[str(path.parent)] == "config"
    data_dir = re.search(r"^persistence_location (\S+)$", conf, re.M).group(1)  # type: ignore[union-attr]
    assert mounts[data_dir.rstrip("/")] == "data"
    assert [t["metadata"]["name"] for t in mosquitto["spec"]["volumeClaimTemplates"]] == ["data"]
    volumes = {v["name"]: v for v in mosquitto["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["secret"]["secretName"] == "maskfl-broker"
    assert broker["command"][-1] == str(Path(mounts_path(mounts, "config")) / "mosquitto.conf")
    port = int(re.search(r"^listener (\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    assert broker["ports"][0]["containerPort"] == port
    assert broker["resources"]["requests"]

    # the coordinator: one replica, its bundle, its state volume, probes, requests
    coordinator = objs[("StatefulSet", "maskfl-coordinator")]
    assert coordinator["spec"]["replicas"] == 1
    main = container(coordinator, "coordinator")
    assert main["image"] == "registry.example.org/maskfl/maskfl-coordinator:0.1.0"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["resources"]["requests"]["cpu"] and main["resources"]["requests"]["memory"]
    env = {e["name"]: e["value"] for e in main["env"]}
    cmounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    toml_path = Path(main["args"][main["args"].index("--config") + 1])
    assert cmounts[str(toml_path.parent)] == "config"
    settings = tomllib.loads((fleet / "coordinator" / "coordinator.toml").read_text())
    assert cmounts[settings["storage"]["dir"]] == "state"
    assert [t["metadata"]["name"] for t in coordinator["spec"]["volumeClaimTemplates"]] == ["state"]
    revocations = Path(env["MASKFL__FLEET__REVOCATIONS_FILE"])
    assert cmounts[str(revocations.parent)] == "bundle"
    assert revocations.name in secrets["maskfl-coordinator"]["data"]
    cvolumes = {v["name"]: v for v in coordinator["spec"]["template"]["spec"]["volumes"]}
    assert cvolumes["bundle"]["secret"]["secretName"] == "maskfl-coordinator"
    # the init container copies the bundle into the folder the coordinator reads, 0600
    init = container(coordinator, "bundle", init=True)
    imounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert imounts["config"] == str(toml_path.parent)
    assert f"{imounts['bundle']}/*" in init["command"][-1] and "-m 0600" in init["command"][-1]
    http = main["ports"][0]["containerPort"]
    assert env["MASKFL__HTTP__PORT"] == str(http) and env["MASKFL__HTTP__HOST"] == "0.0.0.0"

    # services: MQTT over TLS to mosquitto under the name the coordinator connects to,
    # the status port to the coordinator
    assert settings["broker"]["host"] == "mosquitto"
    server = x509.load_pem_x509_certificate((fleet / "broker" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mosquitto" in names.get_values_for_type(x509.DNSName)
    assert settings["broker"]["port"] == port
    assert objs[("Service", "mosquitto")]["spec"]["ports"][0]["port"] == port
    public = objs[("Service", "mosquitto-public")]
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["spec"]["selector"] == mosquitto["spec"]["selector"]["matchLabels"]
    status = objs[("Service", "maskfl-coordinator")]
    assert status["spec"]["ports"][0]["port"] == http
    assert status["spec"]["selector"] == coordinator["spec"]["selector"]["matchLabels"]


def mounts_path(mounts: dict[str, str], volume: str) -> str:
    return next(path for path, name in mounts.items() if name == volume)
