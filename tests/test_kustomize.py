"""Kubernetes: the kustomize base, the dev and production overlays, the components.

Each overlay is built with `kubectl kustomize` (the kustomize that ships in kubectl) and what
comes out is checked as a cluster would get it: strict Kubernetes schemas
(kubernetes-validate, offline), references between objects, the command lines against the
real CLI, the alert rules with promtool (syntax and unit tests), and the dev overlay's
OpenBao and setup job against a real OpenBao server. No cluster runs here.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import kubernetes_validate
import pytest
import yaml

from backpack_vault.config import FIELDS, load
from backpack_vault.dev.vault import bao_binary, free_port
from backpack_vault.testing import wait_until

SelfSigned = Callable[..., tuple[Path, Path]]  # the conftest fixture self_signed

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production")
IMAGE = "backpack-vault"  # the repository's Dockerfile
KNOWN_ENV = {f.env for f in FIELDS if f.env} | {"BACKPACK_VAULT_CONFIG"}
CRD_GROUP = "monitoring.coreos.com"  # the Prometheus Operator's kinds: no schema offline
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
# Objects the operator makes by hand (deploy/README.md): everything else a pod refers to
# must be in the build.
BY_HAND = {
    "dev": {"ConfigMap/backpack-demo-worker"},
    "production": {"Secret/backpack-vault-setup", "Secret/backpack-vault-tls"},
}
ALERTS = {
    "BackpackVaultKeyRevoked",
    "BackpackVaultKeyFailover",
    "BackpackVaultKeyMisconfigured",
    "BackpackVaultChecksSystemic",
    "BackpackVaultChecksFailing",
    "BackpackVaultChecksStalled",
    "BackpackVaultNoLeader",
    "BackpackVaultVaultUnreachable",
    "BackpackVaultVaultAuthFailing",
}

Doc = dict[str, Any]


def binary(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; .ci/run installs it)")
    return found


def kustomize(directory: Path) -> list[Doc]:
    result = subprocess.run(
        [binary("kubectl", "kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


_BUILT: dict[str, list[Doc]] = {}


def built(overlay: str) -> list[Doc]:
    """The overlay as `kubectl kustomize` builds it (built once, deep copies handed out)."""
    if overlay not in _BUILT:
        _BUILT[overlay] = kustomize(K8S / "overlays" / overlay)
    return copy.deepcopy(_BUILT[overlay])


def variant(tmp_path: Path, overlay: str, edit: Callable[[Doc], None]) -> list[Doc]:
    """Build a copy of the tree whose overlay kustomization ``edit`` changed, as an operator
    would change it."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    path = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    edit(kustomization)
    path.write_text(yaml.safe_dump(kustomization))
    return kustomize(tree / "overlays" / overlay)


def kustomization(overlay: str) -> Doc:
    return dict(yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text()))


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc, Doc]]:
    """(kind/name, pod template, the object) of every Deployment, Job and CronJob."""
    pods = []
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in {"Deployment", "Job"}:
            pods.append((f"{doc['kind']}/{doc['metadata']['name']}", spec["template"], doc))
        elif doc["kind"] == "CronJob":
            template = spec["jobTemplate"]["spec"]["template"]
            pods.append((f"CronJob/{doc['metadata']['name']}", template, doc))
    return pods


def daemon(docs: list[Doc]) -> Doc:
    (container,) = one(docs, "Deployment", "backpack-vault")["spec"]["template"]["spec"][
        "containers"
    ]
    return dict(container)


def environment(docs: list[Doc], container: Doc, namespace: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom, then env (which wins),
    values from ConfigMaps, Secrets and the pod's namespace resolved."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(by_name["ConfigMap", source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.namespace", var
            env[var["name"]] = namespace
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = by_name["ConfigMap", key["name"]]["data"][key["key"]]
        elif (("Secret", ref["secretKeyRef"]["name"])) in by_name:
            key = ref["secretKeyRef"]
            data = by_name["Secret", key["name"]]["data"][key["key"]]
            env[var["name"]] = base64.b64decode(data).decode()
    return env


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command and args; an unknown name fails the test."""

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the environment"
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, word) for word in words]


def strings(node: Any) -> Iterator[tuple[str, str]]:
    """(key, string) for every string scalar in a document."""
    stack: list[tuple[str, Any]] = [("", node)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
        elif isinstance(item, str):
            yield key, item


def source_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".env"})


def parse_cli(args: list[str]) -> None:
    """Parse a command line with the real click CLI (no command runs); raise on misuse."""
    from backpack_vault.cli import cli  # noqa: PLC0415 - the CLI is the last module written

    ctx = click.Context(cli, info_name="backpack-vault")
    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group):
        word, rest = rest[0], rest[1:]
        sub = command.get_command(ctx, word)
        if sub is None:
            raise click.UsageError(f"no command {word!r} in {ctx.command_path}")
        ctx = click.Context(sub, info_name=word, parent=ctx)
        command = sub
    command.make_context(ctx.info_name, rest, parent=ctx.parent)


def referred(pod: Doc) -> set[str]:
    """kind/name of the service account, ConfigMaps and Secrets a pod spec names."""
    names = (
        {f"ServiceAccount/{pod['serviceAccountName']}"} if "serviceAccountName" in pod else set()
    )
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(f"Secret/{volume['secret']['secretName']}")
        if "configMap" in volume:
            names.add(f"ConfigMap/{volume['configMap']['name']}")
    for container in pod["containers"]:
        names |= {f"ConfigMap/{s['configMapRef']['name']}" for s in container.get("envFrom", [])}
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                names.add(f"Secret/{ref['secretKeyRef']['name']}")
            if "configMapKeyRef" in ref:
                names.add(f"ConfigMap/{ref['configMapKeyRef']['name']}")
    return names


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


# -- the build -----------------------------------------------------------------------------


class TestBuild:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    @pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.utils.latest_version()])
    def test_each_overlay_builds_and_matches_the_kubernetes_schemas(
        self, overlay: str, version: str
    ) -> None:
        """`kubectl kustomize` builds the overlay; every object validates strictly."""
        kinds = set()
        for doc in built(overlay):
            kinds.add(doc["kind"])
            if doc["apiVersion"].startswith(f"{CRD_GROUP}/"):
                continue  # checked in TestMonitoring
            kubernetes_validate.validate(doc, version, strict=True)
        common = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "CronJob"}
        expected = {
            "dev": common | {"Secret", "ClusterRoleBinding"},
            "production": common
            | {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"},
        }
        assert kinds == expected[overlay]

    def test_the_validator_rejects_a_misspelt_field(self) -> None:
        """Strict validation fails on an unknown field, so a pass means something."""
        doc = one(built("production"), "Deployment", "backpack-vault")
        doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(
                doc, kubernetes_validate.utils.latest_version(), strict=True
            )

    def test_the_monitoring_component_adds_to_the_dev_overlay(self, tmp_path: Path) -> None:
        """The component also works in dev (plain HTTP scrapes), in the dev namespace."""

        def add(kustomization: Doc) -> None:
            kustomization["components"].append("../../components/monitoring")

        docs = variant(tmp_path, "dev", add)
        monitor = one(docs, "ServiceMonitor")
        assert monitor["metadata"]["namespace"] == kustomization("dev")["namespace"]
        assert "scheme" not in monitor["spec"]["endpoints"][0]
        assert (
            one(docs, "PrometheusRule")["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        )


# -- the namespace and the image tag, in one place ------------------------------------------


class TestOnePlace:
    def test_namespace_and_images_are_set_only_in_the_overlay_kustomizations(self) -> None:
        """No manifest or patch names a namespace or an image tag; only overlays do."""
        for path in source_files():
            if path.suffix != ".yaml":
                continue
            for doc in yaml.safe_load_all(path.read_text()):
                if not isinstance(doc, dict):
                    continue  # a JSON 6902 patch: a list of operations
                where = path.relative_to(K8S)
                if doc.get("kind") in {"Kustomization", "Component"}:
                    in_overlay = path.parent.parent == K8S / "overlays"
                    assert ("namespace" in doc) is in_overlay, where
                    assert ("images" in doc) is in_overlay, where
                    continue
                assert "namespace" not in doc.get("metadata", {}), where
                for key, value in strings(doc):
                    if key == "image":
                        assert ":" not in value, f"{where}: {value}"
                        assert "@" not in value, f"{where}: {value}"
        for name in OVERLAYS:
            images = {i["name"]: i for i in kustomization(name)["images"]}
            assert images[IMAGE]["newTag"], name

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_every_object_lands_in_the_overlay_namespace(self, overlay: str) -> None:
        """Namespaced objects are in the overlay's namespace; so are bound service accounts."""
        namespace = kustomization(overlay)["namespace"]
        docs = built(overlay)
        assert one(docs, "Namespace")["metadata"]["name"] == namespace
        for doc in docs:
            meta = doc["metadata"]
            if doc["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in meta, doc["kind"]
            else:
                assert meta["namespace"] == namespace, f"{doc['kind']}/{meta['name']}"
            for subject in doc.get("subjects", []):
                assert subject["namespace"] == namespace

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_changing_the_overlay_namespace_and_tag_moves_everything(
        self, overlay: str, tmp_path: Path
    ) -> None:
        """Edit only `namespace:` and the image tag: nothing still names the old ones."""
        old = kustomization(overlay)["namespace"]

        def retarget(kustomization: Doc) -> None:
            kustomization["namespace"] = "ns-under-test"
            for image in kustomization["images"]:
                if image["name"] == IMAGE:
                    image["newTag"] = "tag-under-test"

        docs = variant(tmp_path, overlay, retarget)
        assert one(docs, "Namespace")["metadata"]["name"] == "ns-under-test"
        references = re.compile(
            rf"(^|[^\w-]){re.escape(old)}\.svc\b|namespace[=:]\s*{re.escape(old)}\b"
            rf"|system:serviceaccount:{re.escape(old)}:"
        )
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"]["namespace"] == "ns-under-test"
            for key, value in strings(doc):
                assert not (key == "namespace" and value == old), doc["metadata"]["name"]
                assert not references.search(value), value
                if key == "image" and value.startswith(IMAGE):
                    assert value.endswith(":tag-under-test"), value
        images = [v for d in docs for k, v in strings(d) if k == "image" and IMAGE in v]
        assert len(images) >= 2

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_command_lines_resolve_every_variable(self, overlay: str) -> None:
        """Every $(VAR) in a command or args is in the container's environment (the kubelet
        would pass an unknown one on literally)."""
        namespace = kustomization(overlay)["namespace"]
        docs = built(overlay)
        for _, template, _ in pod_specs(docs):
            for container in template["spec"]["containers"]:
                env = environment(docs, container, namespace)
                env |= {  # values the build cannot show: Secrets made by hand
                    v["name"]: "by-hand" for v in container.get("env", []) if v["name"] not in env
                }
                expand(container.get("command", []) + container.get("args", []), env)

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_the_setup_job_binds_the_daemon_where_it_runs(self, overlay: str) -> None:
        """The setup job binds the daemon's role to its service account in its namespace."""
        namespace = kustomization(overlay)["namespace"]
        docs = built(overlay)
        setup = one(docs, "CronJob", "backpack-vault-setup")
        (container,) = setup["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        env = environment(docs, container, namespace) | {"VAULT_TOKEN": "by-hand"}
        args = expand(container["args"], env)
        options = dict(a.removeprefix("--").split("=", 1) for a in args if "=" in a)
        pod = one(docs, "Deployment", "backpack-vault")["spec"]["template"]["spec"]
        assert options["kubernetes-namespace"] == namespace
        assert options["kubernetes-service-account"] == pod["serviceAccountName"]
        daemon_env = environment(docs, daemon(docs), namespace)
        assert options["kubernetes-role"] == daemon_env["BACKPACK_VAULT_KUBERNETES_ROLE"]
        assert setup["spec"]["suspend"] is True  # a template: runs are `create job --from`


# -- the workloads -----------------------------------------------------------------------


class TestWorkloads:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_every_container_is_locked_down(self, overlay: str) -> None:
        """Every pod runs non-root with a read-only root, no escalation, no capabilities, limits."""
        for name, template, _ in pod_specs(built(overlay)):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] == 10001, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert pod["enableServiceLinks"] is False, name
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                assert container["resources"]["limits"]["memory"], name
                assert container["resources"]["requests"], name
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, name  # noqa: S108 - an emptyDir, not a host path

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_daemon_probes_health_and_readiness_on_its_port(self, overlay: str) -> None:
        """Liveness /healthz, readiness /readyz on port 8280; HTTPS only in production."""
        container = daemon(built(overlay))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"api": 8280}
        scheme = {"dev": "HTTP", "production": "HTTPS"}[overlay]
        probes = {
            kind: container[kind]["httpGet"]
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
        assert probes["readinessProbe"]["path"] == "/readyz"
        for probe in probes.values():
            assert probe["port"] == "api"
            assert probe.get("scheme", "HTTP") == scheme

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_selectors_find_their_pods(self, overlay: str) -> None:
        """Services, the PDB and the NetworkPolicy select their pods; target ports exist."""
        docs = built(overlay)
        templates = {name: t for name, t, _ in pod_specs(docs)}
        daemon_labels = templates["Deployment/backpack-vault"]["metadata"]["labels"]
        for service in (d for d in docs if d["kind"] == "Service"):
            chosen = [
                t
                for t in templates.values()
                if selects(service["spec"]["selector"], t["metadata"]["labels"])
            ]
            assert len(chosen) == 1, service["metadata"]["name"]
            ports = {p["name"] for c in chosen[0]["spec"]["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports
        for doc in docs:
            if doc["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
                key = "selector" if doc["kind"] == "PodDisruptionBudget" else "podSelector"
                assert selects(doc["spec"][key]["matchLabels"], daemon_labels), doc["kind"]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_what_pods_refer_to_is_built_or_made_by_hand(self, overlay: str) -> None:
        """Every ConfigMap, Secret and service account a pod names exists, or the operator
        makes it (deploy/README.md)."""
        docs = built(overlay)
        present = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
        wanted = set()
        for name, template, _ in pod_specs(docs):
            pod = template["spec"]
            if "serviceAccountName" not in pod:  # the namespace's default account, no token
                assert pod["automountServiceAccountToken"] is False, name
            wanted |= referred(pod)
        assert wanted - present == BY_HAND[overlay]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_settings_are_names_the_service_knows(self, overlay: str) -> None:
        """Every BACKPACK_VAULT_* name in ConfigMaps and pod environments is a setting."""
        docs = built(overlay)
        names = {k for d in docs if d["kind"] == "ConfigMap" for k in d.get("data", {})}
        for _, template, _ in pod_specs(docs):
            for container in template["spec"]["containers"]:
                names |= {e["name"] for e in container.get("env", [])}
        unknown = {n for n in names if n.startswith("BACKPACK_VAULT_")} - KNOWN_ENV
        assert not unknown

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_the_daemon_environment_loads_as_settings(self, overlay: str) -> None:
        """The daemon's environment, as its pod gets it, loads: Kubernetes auth, our role."""
        docs = built(overlay)
        env = environment(docs, daemon(docs), kustomization(overlay)["namespace"])
        settings = load(env)
        assert settings.vault.auth == "kubernetes"
        assert settings.vault.kubernetes_role == "backpack-vault"
        assert settings.vault.addr == env["VAULT_ADDR"]
        assert settings.listen == "0.0.0.0:8280"

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_the_cli_accepts_every_command_line(self, overlay: str) -> None:
        """Each backpack-vault command line in the build parses with the real CLI."""
        docs = built(overlay)
        namespace = kustomization(overlay)["namespace"]
        lines = 0
        for _, template, _ in pod_specs(docs):
            for container in template["spec"]["containers"]:
                if container["image"].startswith(IMAGE) and "command" not in container:
                    env = environment(docs, container, namespace) | {"VAULT_TOKEN": "x"}
                    parse_cli(expand(container["args"], env))
                    lines += 1
        assert lines == 2  # serve, vault setup


# -- production and dev ----------------------------------------------------------------------


class TestProduction:
    def test_two_replicas_a_disruption_budget_and_a_network_policy(self) -> None:
        """Two replicas that may not both be evicted; only labelled clients get in."""
        docs = built("production")
        assert one(docs, "Deployment", "backpack-vault")["spec"]["replicas"] == 2
        assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
        policy = one(docs, "NetworkPolicy")["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        (ingress,) = policy["ingress"]
        assert ingress["from"][0]["podSelector"]["matchLabels"] == {
            "backpack-vault.io/client": "true"
        }
        assert ingress["ports"] == [{"protocol": "TCP", "port": 8280}]

    def test_the_worker_api_serves_tls_from_the_secret(self) -> None:
        """The kubernetes.io/tls Secret is mounted; the TLS settings name its files."""
        docs = built("production")
        pod = one(docs, "Deployment", "backpack-vault")["spec"]["template"]["spec"]
        container = daemon(docs)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        assert volumes["tls"]["secret"]["secretName"] == "backpack-vault-tls"
        assert mount["readOnly"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["BACKPACK_VAULT_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
        assert env["BACKPACK_VAULT_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
        # Group-readable, by the daemon's fsGroup.
        assert volumes["tls"]["secret"]["defaultMode"] == 0o440
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]

    def test_resources_and_an_external_vault(self) -> None:
        """Requests and limits for CPU and memory; Vault over HTTPS, not a dev server."""
        docs = built("production")
        resources = daemon(docs)["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
        env = environment(docs, daemon(docs), "backpack-vault")
        assert env["VAULT_ADDR"].startswith("https://")
        assert not [d for d in docs if d["metadata"]["name"] == "openbao"]


class TestDev:
    def test_an_openbao_dev_server_for_the_daemon(self) -> None:
        """The daemon's VAULT_ADDR is the dev server's Service; one replica, plain HTTP."""
        docs = built("dev")
        env = environment(docs, daemon(docs), kustomization("dev")["namespace"])
        service = one(docs, "Service", "openbao")
        (port,) = service["spec"]["ports"]
        assert env["VAULT_ADDR"] == f"http://{service['metadata']['name']}:{port['port']}"
        assert one(docs, "Deployment", "backpack-vault")["spec"]["replicas"] == 1
        assert not {"BACKPACK_VAULT_TLS_CERT", "BACKPACK_VAULT_TLS_KEY"} & set(env)
        bao = one(docs, "Deployment", "openbao")["spec"]["template"]["spec"]["containers"][0]
        assert "-dev" in bao["command"]
        binding = one(docs, "ClusterRoleBinding")
        assert binding["roleRef"]["name"] == "system:auth-delegator"
        assert (
            binding["subjects"][0]["name"]
            == one(docs, "ServiceAccount", "openbao")["metadata"]["name"]
        )

    def test_the_example_worker_gets_its_role_and_the_daemon(self) -> None:
        """The worker's service account and role match the setup job's; it finds the daemon
        and Vault in its own namespace."""
        docs = built("dev")
        namespace = kustomization("dev")["namespace"]
        worker = one(docs, "Deployment", "backpack-worker-demo")["spec"]["template"]
        (container,) = worker["spec"]["containers"]
        env = environment(docs, container, namespace)
        setup = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert "--kubernetes-worker=demo" in setup["containers"][0]["args"]
        assert env["VAULT_ROLE"] == worker["spec"]["serviceAccountName"] == "backpack-worker-demo"
        assert env["VAULT_ADDR"] == environment(docs, daemon(docs), namespace)["VAULT_ADDR"]
        assert env["BROKER_URL"] == "http://backpack-vault:8280"
        assert worker["metadata"]["labels"]["backpack-vault.io/client"] == "true"

    def test_the_example_worker_neither_creates_nor_relabels_a_namespace(self) -> None:
        """The component has no Namespace, no namespace and no label that would reach one."""
        component = K8S / "components" / "example-worker"
        for path in component.glob("*.yaml"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert doc["kind"] != "Namespace", path.name
                assert "namespace" not in doc.get("metadata", {}), path.name
                for key in ("namespace", "labels", "commonLabels", "commonAnnotations"):
                    assert key not in doc, f"{path.name}: {key}"
        # The dev namespace is exactly the base's, renamed.
        base = kustomize(K8S / "base")
        dev = one(built("dev"), "Namespace")["metadata"]
        assert dev["labels"] == one(base, "Namespace")["metadata"]["labels"]
        assert "annotations" not in dev


class RealBao:
    """The dev overlay's OpenBao container, run here with the real bao binary on loopback."""

    def __init__(self, command: list[str], env: dict[str, str], work: Path) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        listen = [w for w in command if w.startswith("-dev-listen-address=")]
        assert listen == ["-dev-listen-address=0.0.0.0:8200"]
        argv = [
            bao_binary() if w == "bao" else w.replace("0.0.0.0:8200", f"127.0.0.1:{self.port}")
            for w in command
        ]
        self.env = env | {"HOME": str(work), "BAO_ADDR": self.addr}
        self.env["PATH"] = f"{Path(bao_binary()).parent}:{os.environ['PATH']}"
        with (work / "bao.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.mark.slow
class TestDevAgainstARealOpenBao:
    def test_dev_server_hook_and_setup_job_make_the_roles_the_pods_use(
        self, self_signed: SelfSigned
    ) -> None:
        """The dev OpenBao command and its postStart hook, then the setup job's command line,
        run for real: Kubernetes auth is configured and the roles bind the overlay's service
        accounts in its namespace to their policies. A second setup run succeeds too."""
        docs = built("dev")
        namespace = kustomization("dev")["namespace"]
        bao_pod = one(docs, "Deployment", "openbao")["spec"]["template"]["spec"]
        (bao,) = bao_pod["containers"]
        work = Path(tempfile.mkdtemp(prefix="bv-k8s-bao-"))
        server = RealBao(bao["command"], environment(docs, bao, namespace), work)
        try:
            wait_until(lambda: _answers(f"{server.addr}/v1/sys/health"), 20, "the dev server")
            *shell, script = bao["lifecycle"]["postStart"]["exec"]["command"]
            # In a pod, OpenBao reads the cluster's CA from its service account's mount;
            # here there is none, so it gets one from a file (the only change).
            host = "kubernetes_host=https://kubernetes.default.svc:443"
            assert host in script
            ca = work / "cluster-ca.pem"
            ca.write_bytes(self_signed("test cluster CA")[0].read_bytes())
            script = script.replace(host, f"{host} kubernetes_ca_cert=@{ca}")
            for _ in range(2):  # a restarted container runs it again
                result = subprocess.run(
                    [*shell, script],
                    env=server.env,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=60,
                )
                assert result.returncode == 0, result.stdout + result.stderr

            setup = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            (job,) = setup["containers"]
            env = environment(docs, job, namespace) | {"VAULT_ADDR": server.addr}
            argv = [str(Path(sys.executable).parent / "backpack-vault"), *expand(job["args"], env)]
            env |= {"PATH": os.environ["PATH"], "HOME": str(work)}
            for _ in range(2):
                result = subprocess.run(
                    argv, env=env, capture_output=True, text=True, check=False, timeout=60
                )
                assert result.returncode == 0, result.stdout + result.stderr

            token = {"X-Vault-Token": server.env["BAO_TOKEN"]}

            def read(path: str) -> Doc:
                answer = httpx.get(f"{server.addr}/v1/{path}", headers=token)
                assert answer.status_code == 200, (path, answer.text)
                return dict(answer.json()["data"])

            config = read("auth/kubernetes/config")
            daemon_role = read("auth/kubernetes/role/backpack-vault")
            worker_role = read("auth/kubernetes/role/backpack-worker-demo")
        finally:
            server.stop()
            shutil.rmtree(work, ignore_errors=True)
        assert config["kubernetes_host"] == "https://kubernetes.default.svc:443"
        daemon_sa = one(docs, "Deployment", "backpack-vault")["spec"]["template"]["spec"][
            "serviceAccountName"
        ]
        assert daemon_role["bound_service_account_names"] == [daemon_sa]
        assert daemon_role["bound_service_account_namespaces"] == [namespace]
        assert daemon_role["token_policies"] == ["backpack-vault-daemon"]
        assert worker_role["bound_service_account_names"] == ["backpack-worker-demo"]
        assert worker_role["bound_service_account_namespaces"] == [namespace]
        assert worker_role["token_policies"] == ["backpack-worker-demo"]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- monitoring ----------------------------------------------------------------------------


def rule_groups(docs: list[Doc]) -> list[Doc]:
    return list(one(docs, "PrometheusRule")["spec"]["groups"])


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool", "prometheus"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def series(name: str, values: str, **labels: str) -> Doc:
    shown = ", ".join(f'{k}="{v}"' for k, v in {"namespace": "ns", **labels}.items())
    return {"series": f"{name}{{{shown}}}", "values": values}


def alert_at(minutes: int, name: str, *expected: dict[str, str]) -> Doc:
    return {
        "eval_time": f"{minutes}m",
        "alertname": name,
        "exp_alerts": [{"exp_labels": labels} for labels in expected],
    }


CHECKS = "backpack_vault_checks_total"
# Unit tests for the alerts (promtool test rules): one-minute samples; "_" is no sample.
RULE_TESTS: list[Doc] = [
    {  # a failover warns for an hour (the name has no standby now); a rotation does not
        "input_series": [
            series("backpack_vault_key_switches_total", "0 0 1x70", key="main/a", kind="failover"),
            series("backpack_vault_key_switches_total", "0 0 1x70", key="main/b", kind="rotation"),
        ],
        "alert_rule_test": [
            alert_at(1, "BackpackVaultKeyFailover"),
            alert_at(
                5,
                "BackpackVaultKeyFailover",
                {"severity": "warning", "namespace": "ns", "key": "main/a"},
            ),
            alert_at(70, "BackpackVaultKeyFailover"),
        ],
    },
    {  # a revoked key alerts at once; an active one does not
        "input_series": [
            series("backpack_vault_key_status", "0 0 1x20", key="main/a", status="revoked"),
            series("backpack_vault_key_status", "0x20", key="main/b", status="revoked"),
        ],
        "alert_rule_test": [
            alert_at(1, "BackpackVaultKeyRevoked"),
            alert_at(
                5,
                "BackpackVaultKeyRevoked",
                {"severity": "critical", "namespace": "ns", "key": "main/a"},
            ),
        ],
    },
    {  # a MISCONFIGURED verdict alerts at its first appearance and while it repeats
        "input_series": [
            series(CHECKS, "_x70 1x100", key="main/a", verdict="MISCONFIGURED", reason="none"),
            series(CHECKS, "1x180", key="main/b", verdict="MISCONFIGURED", reason="none"),
            series(CHECKS, "1+1x180", key="main/c", verdict="MISCONFIGURED", reason="none"),
        ],
        "alert_rule_test": [
            alert_at(
                75,
                "BackpackVaultKeyMisconfigured",
                {"severity": "critical", "namespace": "ns", "key": "main/a"},
                {"severity": "critical", "namespace": "ns", "key": "main/c"},
            ),
            alert_at(
                150,
                "BackpackVaultKeyMisconfigured",
                {"severity": "critical", "namespace": "ns", "key": "main/c"},
            ),
        ],
    },
    {  # UNKNOWN(systemic): the first one alerts, and the alert ends an hour after the last
        "input_series": [
            series(
                CHECKS, "_x30 1x100", pod="p0", key="main/a", verdict="UNKNOWN", reason="systemic"
            ),
            series(CHECKS, "1+1x120", pod="p0", key="main/a", verdict="UNKNOWN", reason="network"),
        ],
        "alert_rule_test": [
            alert_at(20, "BackpackVaultChecksSystemic"),
            alert_at(
                35, "BackpackVaultChecksSystemic", {"severity": "critical", "namespace": "ns"}
            ),
            alert_at(100, "BackpackVaultChecksSystemic"),
        ],
    },
    {  # an hour of nothing but UNKNOWN alerts (after 15 minutes); a VALID now and then not
        "input_series": [
            series(CHECKS, "1+1x30 31x150", key="main/a", verdict="VALID", reason="accepted"),
            series(CHECKS, "0x30 1+1x150", key="main/a", verdict="UNKNOWN", reason="network"),
            series(CHECKS, "1+1x180", key="main/b", verdict="VALID", reason="accepted"),
            series(CHECKS, "1+1x180", key="main/b", verdict="UNKNOWN", reason="rate_limited"),
        ],
        "alert_rule_test": [
            alert_at(60, "BackpackVaultChecksFailing"),
            alert_at(95, "BackpackVaultChecksFailing"),  # pending
            alert_at(
                120,
                "BackpackVaultChecksFailing",
                {"severity": "warning", "namespace": "ns", "key": "main/a"},
            ),
        ],
    },
    {  # a key not checked for 30 minutes; not a deleted or retired one
        "input_series": [
            series("backpack_vault_key_last_checked_timestamp_seconds", "0x60", key="main/a"),
            series("backpack_vault_key_status", "1x60", key="main/a", status="active"),
            series("backpack_vault_key_last_checked_timestamp_seconds", "0+60x60", key="main/b"),
            series("backpack_vault_key_status", "1x60", key="main/b", status="active"),
            series("backpack_vault_key_last_checked_timestamp_seconds", "0x60", key="main/gone"),
            series("backpack_vault_key_last_checked_timestamp_seconds", "0x60", key="main/old"),
            series("backpack_vault_key_status", "0x60", key="main/old", status="active"),
            series("backpack_vault_key_status", "1x60", key="main/old", status="retired"),
        ],
        "alert_rule_test": [
            alert_at(35, "BackpackVaultChecksStalled"),  # pending
            alert_at(
                45,
                "BackpackVaultChecksStalled",
                {"severity": "warning", "namespace": "ns", "key": "main/a"},
            ),
        ],
    },
    {  # no replica holds the lease
        "input_series": [
            series("backpack_vault_checks_leader", "1x10 0x20", pod="p0"),
            series("backpack_vault_checks_leader", "0x30", pod="p1"),
        ],
        "alert_rule_test": [
            alert_at(10, "BackpackVaultNoLeader"),
            alert_at(13, "BackpackVaultNoLeader"),  # pending
            alert_at(20, "BackpackVaultNoLeader", {"severity": "critical", "namespace": "ns"}),
        ],
    },
    {  # no replica reports at all
        "input_series": [series("backpack_vault_vault_reachable", "1x10", pod="p0")],
        "alert_rule_test": [
            alert_at(10, "BackpackVaultNoLeader", {"severity": "critical"}),
        ],
    },
    {  # one replica cannot reach Vault; another reaches it and is refused
        "input_series": [
            series("backpack_vault_vault_reachable", "0x10", pod="p0"),
            series("backpack_vault_vault_authenticated", "0x10", pod="p0"),
            series("backpack_vault_vault_reachable", "1x10", pod="p1"),
            series("backpack_vault_vault_authenticated", "0x10", pod="p1"),
            series("backpack_vault_vault_reachable", "1x10", pod="p2"),
            series("backpack_vault_vault_authenticated", "1x10", pod="p2"),
        ],
        "alert_rule_test": [
            alert_at(1, "BackpackVaultVaultUnreachable"),  # pending
            alert_at(
                5,
                "BackpackVaultVaultUnreachable",
                {"severity": "critical", "namespace": "ns", "pod": "p0"},
            ),
            alert_at(
                5,
                "BackpackVaultVaultAuthFailing",
                {"severity": "critical", "namespace": "ns", "pod": "p1"},
            ),
        ],
    },
]


class TestMonitoring:
    def test_the_service_monitor_scrapes_the_daemon_service(self) -> None:
        """The ServiceMonitor selects the daemon's Service by label and names its port."""
        docs = built("production")
        monitor = one(docs, "ServiceMonitor")
        service = one(docs, "Service", "backpack-vault")
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                                 "tlsConfig"}  # fmt: skip
        assert endpoint["scheme"] == "https"
        tls = endpoint["tlsConfig"]
        pod = one(docs, "Deployment", "backpack-vault")["spec"]["template"]["spec"]
        secret = next(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v)
        assert tls["ca"]["secret"] == {"name": secret, "key": "ca.crt"}
        assert tls["serverName"] == service["metadata"]["name"]

    def test_the_rules_are_the_recommended_alerts(self) -> None:
        """One alert per recommended condition, each with a severity and annotations."""
        rules = [r for g in rule_groups(built("production")) for r in g["rules"]]
        assert {r["alert"] for r in rules} == ALERTS
        assert len(rules) == len(ALERTS)
        for rule in rules:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]

    def test_promtool_checks_the_rules(self, tmp_path: Path) -> None:
        """`promtool check rules` accepts the PrometheusRule's groups (queries and templates)."""
        (tmp_path / "rules.yaml").write_text(
            yaml.safe_dump({"groups": rule_groups(built("production"))})
        )
        result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout

    def test_promtool_rejects_a_broken_rule(self, tmp_path: Path) -> None:
        """The same check fails on a broken query, so a pass means something."""
        groups = rule_groups(built("production"))
        groups[0]["rules"][0]["expr"] = "max by (key (backpack_vault_key_status)"
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0

    def test_the_alerts_fire_when_they_should(self, tmp_path: Path) -> None:
        """promtool's rule unit tests: each alert fires on its condition (after its `for`)
        and not on the near misses next to it."""
        groups = rule_groups(built("production"))
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations")  # their text is not what these tests are about
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        tested = {t["alertname"] for case in RULE_TESTS for t in case["alert_rule_test"]}
        assert tested == ALERTS
        tests = {
            "rule_files": ["rules.yaml"],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", **case} for case in RULE_TESTS],
        }
        (tmp_path / "tests.yaml").write_text(json.dumps(tests))
        result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
