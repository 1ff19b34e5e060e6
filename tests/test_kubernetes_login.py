"""Kubernetes auth, end to end: the daemon and a worker log in with a service account token.

OpenBao's ``kubernetes`` auth method (a real one, on the session's dev server)
validates a pod's service account JWT by asking the cluster's TokenReview API.
There is no cluster here, so a stand-in Kubernetes API on loopback answers
TokenReview for the tokens this test minted, exactly as the API server would
(``authentication.k8s.io/v1``), and refuses every other token. Everything after
that is real: `vault setup`'s roles, the daemon's login from a JWT file, a
worker's login (``BACKPACK_VAULT_WORKER_AUTH=kubernetes``), grants, a signature.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backpack_vault.client.broker import BrokerClient
from backpack_vault.client.vault_auth import VaultAuth
from backpack_vault.config import BrokerSettings, CheckSettings, Settings, VaultSettings
from backpack_vault.core.keys import KeyRef
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.errors import NotAuthenticated, VaultDenied
from backpack_vault.testing import store_key
from backpack_vault.vault.client import Vault

SelfSigned = Callable[..., tuple[Path, Path]]  # the conftest fixture self_signed

REF = KeyRef("trading", "bot-a")
MOUNT = "k8s-test"  # its own auth mount: other tests' setups never meet it


def _b64(data: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def service_account_jwt(namespace: str, name: str) -> str:
    """A token shaped like a pod's projected service account token (the stand-in
    API server knows it; OpenBao never checks its signature itself here)."""
    claims = {
        "iss": "https://kubernetes.default.svc",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": f"uid-{name}",
    }
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2lnbmF0dXJl"


@dataclass
class Cluster:
    """The stand-in API server: the tokens it issued, and the reviews it answered."""

    url: str = ""
    issued: dict[str, tuple[str, str]] = field(default_factory=dict)  # jwt -> (ns, name)
    reviews: int = 0

    def issue(self, namespace: str, name: str) -> str:
        token = service_account_jwt(namespace, name)
        self.issued[token] = (namespace, name)
        return token

    async def review(self, request: Request) -> JSONResponse:
        self.reviews += 1
        body = await request.json()
        found = self.issued.get(str(body.get("spec", {}).get("token", "")))
        status: dict[str, object] = {"authenticated": False, "error": "token not found"}
        if found is not None:
            namespace, name = found
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{namespace}:{name}",
                    "uid": f"uid-{name}",
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                },
            }
        return JSONResponse(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status},
            status_code=201,
        )


@pytest.fixture
def cluster(
    dev_vault: DevVault, vault_settings: VaultSettings, self_signed: SelfSigned
) -> Iterator[Cluster]:
    """The auth mount configured against the stand-in API server, with two roles: the
    daemon's (its policy) and a worker's (root-equivalent grants are not needed: a
    worker policy for one key's copies and signatures)."""
    cluster = Cluster()
    app = Starlette(
        routes=[
            Route("/apis/authentication.k8s.io/v1/tokenreviews", cluster.review, methods=["POST"])
        ]
    )
    admin = hvac.Client(url=dev_vault.addr, token=dev_vault.root_token.reveal())
    with ServerThread(app) as api:
        cluster.url = api.url
        if f"{MOUNT}/" not in admin.sys.list_auth_methods()["data"]:
            admin.sys.enable_auth_method("kubernetes", path=MOUNT)
        reviewer = cluster.issue("kube-system", "token-reviewer")
        admin.write(
            f"auth/{MOUNT}/config",
            kubernetes_host=api.url,
            kubernetes_ca_cert=self_signed("kubernetes")[0].read_text(),
            token_reviewer_jwt=reviewer,
            disable_local_ca_jwt=True,
        )
        prefix, grants = vault_settings.kv_prefix, vault_settings.grant_prefix
        admin.sys.create_or_update_policy(
            f"{prefix}-daemon",
            f'path "secret/data/{prefix}/*" {{ capabilities = ["read"] }}\n'
            f'path "secret/metadata/{prefix}/*" {{ capabilities = ["read", "list"] }}\n'
            f'path "secret/data/{prefix}-*" {{ capabilities = ["create", "read", "update"] }}\n'
            'path "sys/wrapping/wrap" { capabilities = ["update"] }\n',
        )
        admin.sys.create_or_update_policy(
            f"{prefix}-worker",
            f'path "{grants}/{REF}/sign/accountQuery" {{ capabilities = ["update"] }}\n',
        )
        admin.write(
            f"auth/{MOUNT}/role/{prefix}-daemon",
            bound_service_account_names="backpack-vault",
            bound_service_account_namespaces="backpack-vault",
            policies=f"{prefix}-daemon",
            ttl="1h",
        )
        admin.write(
            f"auth/{MOUNT}/role/{prefix}-worker",
            bound_service_account_names="bot",
            bound_service_account_namespaces="trading",
            policies=f"{prefix}-worker",
            ttl="1h",
        )
        yield cluster


def jwt_file(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / name
    path.write_text(token)
    path.chmod(0o600)
    return path


class TestKubernetesLogin:
    def test_the_daemon_logs_in_with_its_service_account_and_a_worker_with_its_own(
        self,
        cluster: Cluster,
        vault: Vault,
        vault_settings: VaultSettings,
        dev_vault: DevVault,
        tmp_path: Path,
    ) -> None:
        pair = store_key(vault, REF)
        prefix = vault_settings.kv_prefix
        daemon_jwt = jwt_file(tmp_path, "daemon", cluster.issue("backpack-vault", "backpack-vault"))
        settings = VaultSettings(
            addr=dev_vault.addr,
            auth="kubernetes",
            kubernetes_role=f"{prefix}-daemon",
            kubernetes_jwt_file=str(daemon_jwt),
            auth_mount=MOUNT,
            kv_prefix=prefix,
            grant_prefix=vault_settings.grant_prefix,
        )
        daemon_vault = Vault(settings)
        info = daemon_vault.login()
        assert f"{prefix}-daemon" in info.policies
        assert info.ttl > 0
        assert daemon_vault.read_key(REF)[0].api_key == pair.api_key  # the policy is its own

        daemon = Daemon(Settings(settings, BrokerSettings(), CheckSettings()))
        worker_jwt = jwt_file(tmp_path, "worker", cluster.issue("trading", "bot"))
        auth = VaultAuth.kubernetes(role=f"{prefix}-worker", jwt_file=worker_jwt, mount=MOUNT)
        with (
            daemon,
            ServerThread(daemon.app) as served,
            BrokerClient(served.url, vault_addr=dev_vault.addr, auth=auth) as broker,
        ):
            headers = broker.sign(REF, "accountQuery")
        assert headers["X-API-Key"] == pair.api_key
        assert cluster.reviews >= 2  # both logins were reviewed by the API server

    @pytest.mark.usefixtures("cluster")
    def test_a_token_the_cluster_does_not_know_is_refused_clearly(
        self, vault_settings: VaultSettings, dev_vault: DevVault, tmp_path: Path
    ) -> None:
        forged = jwt_file(
            tmp_path, "forged", service_account_jwt("backpack-vault", "backpack-vault")
        )
        settings = VaultSettings(
            addr=dev_vault.addr,
            auth="kubernetes",
            kubernetes_role=f"{vault_settings.kv_prefix}-daemon",
            kubernetes_jwt_file=str(forged),
            auth_mount=MOUNT,
            kv_prefix=vault_settings.kv_prefix,
        )
        with pytest.raises((VaultDenied, NotAuthenticated)) as refused:
            Vault(settings).login()
        assert dev_vault.addr in refused.value.message  # it says which Vault refused
        assert "eyJ" not in refused.value.message  # and never echoes the token

    def test_a_service_account_the_role_does_not_bind_is_refused(
        self, cluster: Cluster, vault_settings: VaultSettings, dev_vault: DevVault, tmp_path: Path
    ) -> None:
        other = jwt_file(tmp_path, "other", cluster.issue("trading", "someone-else"))
        auth = VaultAuth.kubernetes(
            role=f"{vault_settings.kv_prefix}-worker", jwt_file=other, mount=MOUNT
        )
        with (
            BrokerClient("http://127.0.0.1:9", vault_addr=dev_vault.addr, auth=auth) as broker,
            pytest.raises(NotAuthenticated),
        ):
            broker.sign(REF, "accountQuery")
