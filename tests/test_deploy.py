"""Deployment files: the Dockerfile, the compose demo, the Kubernetes manifests.

No Docker engine or cluster runs here, so each file is checked by the tools that ship their
rules: hadolint for the Dockerfile, the compose-spec schema vendored by check-jsonschema for
compose.yaml, and the Kubernetes schemas shipped by kubernetes-validate for the manifests.
What the schemas cannot see (services that depend on missing services, selectors that match
no pod, command lines the CLI would reject) is checked here against the real code, and the
compose OpenBao config and its init script run against a real OpenBao server.

The Kubernetes checks here read the kustomize sources (base, overlays, components) as they
are, with no tool; tests/test_kustomize.py checks what `kubectl kustomize` builds from them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import click
import httpx
import hvac
import jsonschema
import kubernetes_validate
import pytest
import yaml

from backpack_vault.config import (
    FIELDS,
    BrokerSettings,
    CheckSettings,
    Secret,
    Settings,
    VaultSettings,
    load,
)
from backpack_vault.core.keys import KeyRef
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault, bao_binary, free_port
from backpack_vault.testing import sandbox
from backpack_vault.vault import setup as provision
from backpack_vault.vault.client import Vault

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "kubernetes"
CRD_GROUP = "monitoring.coreos.com"  # the Prometheus Operator's kinds: no schema offline
IMAGE = "backpack-vault"  # services built from the repository's Dockerfile
KNOWN_ENV = {f.env for f in FIELDS if f.env} | {"BACKPACK_VAULT_CONFIG"}


def tool(name: str) -> str:
    """A console script installed beside this interpreter (the dev extra), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def kustomizations() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, yaml.safe_load(p.read_text())) for p in sorted(K8S.rglob("kustomization.yaml"))]


def patch_files() -> set[Path]:
    return {
        (path.parent / patch["path"]).resolve()
        for path, doc in kustomizations()
        for patch in doc.get("patches", [])
        if "path" in patch
    }


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every complete object in the kustomize sources (not kustomizations, not patches)."""
    skip = patch_files() | {p.resolve() for p, _ in kustomizations()}
    return [
        (path, doc)
        for path in sorted(K8S.rglob("*.yaml"))
        if path.resolve() not in skip
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment, Job and CronJob."""
    pods = []
    for _, doc in manifests():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "Job"}:
            pods.append((name, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            pods.append((name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return pods


def env_names(node: Any) -> set[str]:
    """The names in every `env:` list anywhere in a document (a patch too)."""
    names: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            env = item.get("env")
            if isinstance(env, list):
                names |= {e["name"] for e in env if isinstance(e, dict)}
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names


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


class TestDockerfile:
    def test_hadolint_finds_nothing(self) -> None:
        """hadolint reports no rule violation at any severity."""
        result = subprocess.run(
            [tool("hadolint"), "--failure-threshold", "style", "Dockerfile"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_runtime_stage_is_slim_non_root_and_serves_by_default(self) -> None:
        """The final stage is python:3.11-slim, runs as uid 10001 and starts `serve` on 8280."""
        instructions = dockerfile_instructions()
        assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
        stage = final_stage()
        assert stage[0] == ("FROM", "${PYTHON_IMAGE} AS runtime")
        ops = dict(stage)
        assert ops["USER"] == "10001:10001"
        assert ops["EXPOSE"] == "8280"
        assert "BACKPACK_VAULT_LISTEN=0.0.0.0:8280" in ops["ENV"].split()
        assert json.loads(ops["ENTRYPOINT"]) == ["backpack-vault"]
        assert json.loads(ops["CMD"]) == ["serve"]
        runs = " ".join(args for op, args in stage if op == "RUN")
        for banned in ("apt-get", "curl", "gcc", "build-essential", "COPY . "):
            assert banned not in runs
        assert not [args for op, args in stage if op in {"COPY", "ADD"}]  # wheels only, by mount

    def test_healthcheck_passes_on_a_live_healthz_and_fails_without_one(self) -> None:
        """The HEALTHCHECK command (stdlib Python, no curl) exits 0 only while /healthz answers."""
        spec = dict(final_stage())["HEALTHCHECK"]
        argv = json.loads(spec[spec.index("CMD") + 3 :])
        assert argv[0] == "python"
        seen: list[str] = []

        class Health(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), Health)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            env = {"PATH": os.environ["PATH"], "BACKPACK_VAULT_LISTEN": f"0.0.0.0:{port}"}
            alive = subprocess.run([sys.executable, *argv[1:]], env=env, check=False)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
        env["BACKPACK_VAULT_LISTEN"] = f"0.0.0.0:{free_port()}"
        dead = subprocess.run(
            [sys.executable, *argv[1:]], env=env, capture_output=True, check=False
        )
        assert alive.returncode == 0
        assert seen == ["/healthz"]
        assert dead.returncode != 0

    def test_build_context_admits_only_what_the_builder_copies(self) -> None:
        """.dockerignore starts from nothing and re-admits just what the builder copies."""
        patterns = [
            line.strip()
            for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert patterns[0] == "*"
        admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        copied = set()
        for op, args in dockerfile_instructions():
            if op == "COPY" and not args.startswith("--from"):
                copied |= {src.rstrip("/") for src in args.split()[:-1]}
        assert copied == admitted == {"pyproject.toml", "README.md", "service"}


class TestCompose:
    def test_matches_the_compose_specification(self) -> None:
        """compose.yaml is valid under the compose-spec JSON schema vendored by check-jsonschema."""
        schema_file = (
            resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
        )
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
        assert errors == []

    def test_the_schema_catches_a_misspelt_key(self) -> None:
        """The same check rejects a service with an unknown key, so a pass means something."""
        schema_file = (
            resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
        )
        validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text("utf-8")))
        broken = compose()
        broken["services"]["backpack-vault"]["dependson"] = ["openbao"]
        assert not validator.is_valid(broken)

    def test_references_resolve(self) -> None:
        """Dependencies name services, volumes are declared, bind sources exist, ports are local."""
        doc = compose()
        services: dict[str, Any] = doc["services"]
        declared = set(doc["volumes"])
        for name, service in services.items():
            assert set(service.get("depends_on", {})) <= set(services), name
            for volume in service.get("volumes", []):
                source = volume.split(":", 1)[0]
                if source.startswith("."):
                    assert (DEPLOY / source).exists(), f"{name}: {source}"
                else:
                    assert source in declared, f"{name}: {source}"
            for port in service.get("ports", []):
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host"
            for word in service.get("entrypoint", []):
                if word.startswith("/deploy/"):
                    assert (DEPLOY / word.removeprefix("/deploy/")).is_file(), word

    def test_each_identity_sees_only_its_own_credentials(self) -> None:
        """The daemon and worker mount only their own credentials, never the root token."""
        services = compose()["services"]

        def mounted(name: str) -> set[str]:
            return {v.split(":", 1)[0] for v in services[name].get("volumes", [])}

        assert "bootstrap" not in mounted("backpack-vault") | mounted("worker")
        assert mounted("backpack-vault") & {"daemon-creds", "worker-creds"} == {"daemon-creds"}
        assert mounted("worker") & {"daemon-creds", "worker-creds"} == {"worker-creds"}

    def test_settings_are_names_the_service_knows(self) -> None:
        """Every BACKPACK_VAULT_* variable in compose.yaml is a documented setting."""
        for name, service in compose()["services"].items():
            env = set(service.get("environment", {}))
            unknown = {v for v in env if v.startswith("BACKPACK_VAULT_")} - KNOWN_ENV
            assert not unknown, f"{name}: {unknown}"


def command_lines() -> list[Any]:
    """Every backpack-vault command line in the Dockerfile, compose.yaml and the manifests."""
    lines = [pytest.param(json.loads(dict(final_stage())["CMD"]), id="Dockerfile CMD")]
    lines += [
        pytest.param(service["command"], id=f"compose {name}")
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith(IMAGE) and "entrypoint" not in service
    ]
    lines += [
        pytest.param(container["args"], id=f"{name}/{container['name']}")
        for name, pod in workloads()
        for container in pod["containers"]
        if container["image"].startswith(IMAGE) and "command" not in container
    ]
    # What deploy/demo/seed.py runs.
    lines.append(pytest.param(["keys", "show", "demo/bot-a", "--json"], id="seed.py keys show"))
    add = ["keys", "add", "demo/bot-a", "--api-key", "K", "--label", "demo"]
    lines.append(pytest.param(add, id="seed.py keys add"))
    return lines


class TestCommandLines:
    @pytest.mark.parametrize("args", command_lines())
    def test_the_cli_accepts_every_deployed_command_line(self, args: list[str]) -> None:
        """Each command line in deploy/ and the Dockerfile parses with the real CLI."""
        parse_cli(args)


class TestKubernetes:
    @pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.utils.latest_version()])
    def test_manifests_match_the_kubernetes_schemas(self, version: str) -> None:
        """Every manifest validates strictly (no unknown fields) against the Kubernetes schema."""
        checked = []
        for path, doc in manifests():
            if not doc["apiVersion"].startswith(f"{CRD_GROUP}/"):
                kubernetes_validate.validate(doc, version, strict=True)
            checked.append((path.name, doc["kind"]))
        kinds = {kind for _, kind in checked}
        assert {
            "Deployment", "Service", "ServiceAccount", "NetworkPolicy",
            "PodDisruptionBudget", "CronJob", "Namespace", "ClusterRoleBinding",
            "ServiceMonitor", "PrometheusRule",
        } <= kinds  # fmt: skip

    def test_the_validator_rejects_a_misspelt_field(self) -> None:
        """Strict validation fails on an unknown field, so a pass means something."""
        doc = next(d for _, d in manifests() if d["kind"] == "Deployment")
        doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(
                doc, kubernetes_validate.utils.latest_version(), strict=True
            )

    def test_every_container_is_locked_down(self) -> None:
        """Every pod runs non-root with a read-only root, no escalation, no capabilities, limits."""
        for name, pod in workloads():
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] == 10001, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                assert container["resources"]["limits"]["memory"], name
                assert container["resources"]["requests"], name
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, name  # noqa: S108 - an emptyDir, not a host path

    def test_daemon_probes_health_and_readiness_on_its_port(self) -> None:
        """The daemon's liveness probe is /healthz and its readiness probe /readyz, on 8280."""
        pod = dict(workloads())["Deployment/backpack-vault"]
        (daemon,) = pod["containers"]
        assert daemon["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert daemon["readinessProbe"]["httpGet"]["path"] == "/readyz"
        ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
        assert ports == {"api": 8280}
        assert daemon["livenessProbe"]["httpGet"]["port"] == "api"
        assert daemon["readinessProbe"]["httpGet"]["port"] == "api"

    def test_selectors_find_their_pods(self) -> None:
        """Service, PDB and NetworkPolicy select the daemon; workers carry the client label."""
        docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
        daemon_labels = docs["Deployment", "backpack-vault"]["spec"]["template"]["metadata"][
            "labels"
        ]

        def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
            return bool(selector) and selector.items() <= labels.items()

        assert selects(docs["Service", "backpack-vault"]["spec"]["selector"], daemon_labels)
        pdb = docs["PodDisruptionBudget", "backpack-vault"]["spec"]["selector"]["matchLabels"]
        assert selects(pdb, daemon_labels)
        policy = docs["NetworkPolicy", "backpack-vault"]["spec"]
        assert selects(policy["podSelector"]["matchLabels"], daemon_labels)
        client = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        worker = docs["Deployment", "backpack-worker-demo"]["spec"]["template"]["metadata"]
        assert selects(client, worker["labels"])
        assert not selects(client, daemon_labels)

    def test_kustomizations_name_existing_files_and_use_every_file(self) -> None:
        """Every file a kustomization names exists; every file under kubernetes/ is named."""
        used: set[Path] = set()
        for path, doc in kustomizations():
            used.add(path.resolve())
            names = list(doc.get("resources", [])) + list(doc.get("components", []))
            names += [p["path"] for p in doc.get("patches", []) if "path" in p]
            for generator in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
                names += generator.get("envs", []) + generator.get("files", [])
            for name in names:
                target = (path.parent / name).resolve()
                assert target.exists(), f"{path.relative_to(K8S)}: {name}"
                used.add(target / "kustomization.yaml" if target.is_dir() else target)
        files = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
        assert files - used == set()

    def test_settings_are_names_the_service_knows(self) -> None:
        """The settings file, generator literals and pod environments (patches included) use
        only documented setting names."""
        names = set()
        for line in (K8S / "base" / "settings.env").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                names.add(line.split("=", 1)[0])
        for _, doc in kustomizations():
            for generator in doc.get("configMapGenerator", []):
                names |= {literal.split("=", 1)[0] for literal in generator.get("literals", [])}
        for path in sorted(K8S.rglob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                names |= env_names(doc)
        assert "VAULT_ADDR" in names
        unknown = {n for n in names if n.startswith("BACKPACK_VAULT_")} - KNOWN_ENV
        assert not unknown


class ComposeBao:
    """The real OpenBao server from deploy/openbao/config.hcl, on loopback, storage in a temp dir.

    Only addresses and the storage path are changed; it is stopped by PID.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.bootstrap = work / "bootstrap"
        port = free_port()
        self.addr = f"http://127.0.0.1:{port}"
        cluster = free_port()
        config = (DEPLOY / "openbao" / "config.hcl").read_text()
        for where, local in {
            '"0.0.0.0:8200"': f'"127.0.0.1:{port}"',
            '"0.0.0.0:8201"': f'"127.0.0.1:{cluster}"',
            '"http://openbao:8200"': f'"{self.addr}"',
            '"http://openbao:8201"': f'"http://127.0.0.1:{cluster}"',
            '"/openbao/file"': json.dumps(str(work / "data")),
        }.items():
            assert where in config
            config = config.replace(where, local)
        (work / "data").mkdir()
        (work / "config.hcl").write_text(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.work / "bao.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [bao_binary(), "server", f"-config={self.work / 'config.hcl'}"],
                env={"PATH": os.environ["PATH"], "HOME": str(self.work)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def compose_bao() -> Iterator[ComposeBao]:
    work = Path(tempfile.mkdtemp(prefix="bv-compose-bao-"))
    server = ComposeBao(work)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_init(addr: str, bootstrap: Path) -> list[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(bootstrap.parent),
        "BAO_ADDR": addr,
        "BOOTSTRAP_DIR": str(bootstrap),
        "BAO_WAIT_S": "20",
    }
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "openbao" / "init.py")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["event"] for line in result.stdout.splitlines()]


class TestComposeOpenBao:
    def test_config_serves_and_init_initialises_unseals_and_sets_up(
        self, compose_bao: ComposeBao
    ) -> None:
        """config.hcl runs a real server; init.py initialises and unseals it; setup then works."""
        addr, bootstrap = compose_bao.addr, compose_bao.bootstrap
        assert run_init(addr, bootstrap) == ["openbao.initialised", "openbao.unsealed"]
        assert run_init(addr, bootstrap) == ["openbao.already_unsealed"]
        assert httpx.get(f"{addr}/v1/sys/health").status_code == 200
        assert (bootstrap / "init.json").stat().st_mode & 0o777 == 0o600
        assert (bootstrap / "root-token").stat().st_mode & 0o777 == 0o600
        root = Secret((bootstrap / "root-token").read_text())
        settings = Settings(
            vault=VaultSettings(addr=addr, token=root),
            broker=BrokerSettings(),
            checks=CheckSettings(),
        )
        admin = Vault(settings.vault)
        admin.login()
        report = provision.setup(admin, settings, approle_subaccounts=["demo"], approle_daemon=True)
        admin.close()
        # A real server has no secret/ until setup creates it.
        assert report.outcome("secrets engine", "secret/") is provision.Outcome.CREATED

    def test_a_restarted_server_is_unsealed_again_and_keeps_its_data(
        self, compose_bao: ComposeBao
    ) -> None:
        """After a restart (sealed), init.py unseals with the kept key; setup finds its work."""
        addr, bootstrap = compose_bao.addr, compose_bao.bootstrap
        run_init(addr, bootstrap)
        root = Secret((bootstrap / "root-token").read_text())
        settings = Settings(
            vault=VaultSettings(addr=addr, token=root),
            broker=BrokerSettings(),
            checks=CheckSettings(),
        )
        admin = Vault(settings.vault)
        admin.login()
        provision.setup(admin, settings)
        compose_bao.restart()
        assert run_init(addr, bootstrap) == ["openbao.unsealed"]
        again = provision.setup(admin, settings)
        admin.close()
        assert not again.changed


class TestComposeDemoSeed:
    def test_seed_stores_registers_and_writes_working_credentials_idempotently(
        self, tmp_path: Path
    ) -> None:
        """seed.py stores the demo key, registers it, and writes credentials that log in."""
        with DevVault() as server, ServerThread(sandbox.create_app()) as exchange:
            token_file = tmp_path / "root-token"
            token_file.write_text(server.root_token.reveal())
            settings = Settings(
                vault=VaultSettings(addr=server.addr, token=server.root_token),
                broker=BrokerSettings(),
                checks=CheckSettings(),
            )
            admin = Vault(settings.vault)
            admin.login()
            provision.setup(admin, settings, approle_subaccounts=["demo"], approle_daemon=True)
            env = {
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "HOME": str(tmp_path),
                "VAULT_ADDR": server.addr,
                "BACKPACK_VAULT_TOKEN_FILE": str(token_file),
                "BACKPACK_VAULT_LOG_FORMAT": "json",
                "SANDBOX_URL": exchange.url,
                "DEMO_KEY": "demo/bot-a",
                "CREDS_DIR": str(tmp_path / "creds"),
            }
            runs = [
                subprocess.run(
                    [sys.executable, str(DEPLOY / "demo" / "seed.py")],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=60,
                )
                for _ in range(2)
            ]
            for result in runs:
                assert result.returncode == 0, result.stderr
            events = [
                [
                    json.loads(line)["event"]
                    for line in r.stdout.splitlines()
                    if line.startswith("{")
                ]
                for r in runs
            ]
            registered = httpx.get(f"{exchange.url}/_sandbox/keys").json()

            daemon_settings = load(
                {"VAULT_ADDR": server.addr}, tmp_path / "creds/daemon/config.toml"
            )
            daemon = Vault(daemon_settings.vault)
            info = daemon.login()
            record, secret = daemon.read_key(KeyRef("demo", "bot-a"))
            daemon.close()

            creds = tmp_path / "creds" / "worker"
            worker = hvac.Client(url=server.addr, token="").auth.approle.login(
                role_id=(creds / "role-id").read_text(),
                secret_id=(creds / "secret-id").read_text(),
                use_token=False,
            )["auth"]["client_token"]
            grants = admin.capabilities(
                Secret(worker),
                ["backpack-broker/demo/bot-a/sign/balanceQuery", "secret/data/backpack/demo/bot-a"],
            )
            admin.close()
        assert events[0][0] == "demo.key_stored"
        assert events[1][0] == "demo.key_kept"
        assert record.api_key in json.dumps(registered)
        assert provision.DAEMON_POLICY in info.policies
        assert secret.reveal()
        assert grants == {
            "backpack-broker/demo/bot-a/sign/balanceQuery": {"update"},
            "secret/data/backpack/demo/bot-a": {"deny"},
        }
        for path in (tmp_path / "creds").rglob("*"):
            if path.is_file():
                assert path.stat().st_mode & 0o777 == 0o600, path
