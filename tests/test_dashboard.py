"""The Grafana dashboard (deploy/grafana/backpack-vault.json) and the alert rules, against
the metrics a running daemon really exports.

A real daemon (the session's OpenBao dev server, the sandbox exchange, the worker API over
HTTP) checks a stored key, hands out a copy, signs a request, takes a report and renews its
Vault token; its /metrics is then scraped once. Every metric and label that a panel, a
dashboard variable or an alert queries must be in that scrape. The queries themselves are
checked by promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backpack_vault.config import load
from backpack_vault.core.keys import KeyRef, generate_pair
from backpack_vault.core.rotation import NextKey, NextState, Role
from backpack_vault.daemon import Daemon
from backpack_vault.daemon.serving import ServerThread
from backpack_vault.dev.vault import DevVault
from backpack_vault.testing import now_iso, store_key, wait_until
from backpack_vault.testing.sandbox import SandboxAdmin, SandboxState
from backpack_vault.vault.client import Vault

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "backpack-vault.json"
RULES = REPO / "deploy" / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"
REF = KeyRef("main", "bot-a")
# Labels Prometheus adds from the ServiceMonitor's target, not the daemon's own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
# What the dashboard must show (the metrics behind each topic).
SHOWN = {
    "backpack_vault_key_status",
    "backpack_vault_checks_total",
    "backpack_vault_check_duration_seconds_bucket",
    "backpack_vault_clock_offset_seconds_bucket",
    "backpack_vault_handouts_total",
    "backpack_vault_signatures_total",
    "backpack_vault_api_request_seconds_bucket",
    "backpack_vault_wrapping_tokens_outstanding",
    "backpack_vault_vault_reachable",
    "backpack_vault_vault_authenticated",
    "backpack_vault_checks_leader",
}
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$namespace": ".*",
    "$key": ".*",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless"}
KEYWORDS |= {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
KEYWORDS |= {"bottomk", "topk", "quantile"}  # aggregations: `sum by (x) (...)` is no call

Doc = dict[str, Any]


# -- the queries ---------------------------------------------------------------------------


def dashboard() -> Doc:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: Doc) -> Iterator[Doc]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def variable_selectors() -> list[tuple[str, str]]:
    """(variable, series selector) of the dashboard's label_values() variables."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"${variable['name']}: {query}"
        found.append((variable["name"], match.group(1)))
    return found


def rule_queries() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["spec"]["groups"] for r in g["rules"]]


def concrete(expr: str) -> str:
    """A panel's query with Grafana's variables filled in, as Grafana sends it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def parse(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, labels matched on it)], labels grouped or joined on) of a PromQL query.

    Enough PromQL for queries written here: string literals, ranges and offsets are dropped,
    grouping clauses read, and every name not called as a function is a metric.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    grouped: set[str] = set()
    clause = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
    for match in clause.finditer(text):
        grouped |= {name.strip() for name in match.group(2).split(",") if name.strip()}
    text = clause.sub(r"\1", text)
    text = re.sub(r"\boffset\s+\d+[smhdwy]", "", text)
    selectors = []
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = match.groups()
        if call or name in KEYWORDS:
            continue
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        selectors.append((name, labels))
    return selectors, grouped


def all_queries() -> list[Any]:
    return [
        *(pytest.param(q, id=f"panel {t}") for t, q in panel_queries()),
        *(pytest.param(q, id=f"variable ${t}") for t, q in variable_selectors()),
        *(pytest.param(q, id=f"alert {t}") for t, q in rule_queries()),
    ]


# -- the dashboard's shape -------------------------------------------------------------------


class TestDashboard:
    def test_it_is_a_dashboard_grafana_imports(self) -> None:
        """A dashboard JSON with a Prometheus data source variable; panels that use it, have
        unique ids and tile a 24-column grid without overlapping."""
        board = dashboard()
        assert board["uid"] == "backpack-vault"
        assert board["title"]
        assert isinstance(board["schemaVersion"], int)
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for panel in panels(board):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            mine = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & mine, f"{panel['title']} overlaps another panel"
            cells |= mine
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], panel["title"]
            assert panel.get("description"), panel["title"]

    def test_it_shows_every_topic(self) -> None:
        """Key status, verdicts, check latency and clock offset, copies and signatures by key
        and outcome, API latency, outstanding copies, Vault auth state and the leader."""
        queried = {name for _, q in panel_queries() for name, _ in parse(q)[0]}
        assert queried >= SHOWN
        by_key_and_outcome = [
            q for _, q in panel_queries() if re.search(r"by \(key, outcome\)", q) and "_total" in q
        ]
        names = {n for q in by_key_and_outcome for n, _ in parse(q)[0]}
        assert {"backpack_vault_handouts_total", "backpack_vault_signatures_total"} <= names

    @pytest.mark.parametrize(
        "query",
        [
            pytest.param(q, id=t)
            for t, q in panel_queries() + variable_selectors()
            if t != "namespace"  # the variable that lists them
        ],
    )
    def test_every_query_is_limited_to_the_chosen_namespaces(self, query: str) -> None:
        """Each series selector has namespace=~"$namespace" (one Prometheus, many installs)."""
        for name, _ in parse(query)[0]:
            selector = re.search(rf"{name}\{{([^}}]*)\}}", query)
            assert selector, f"{name} without a selector"
            assert 'namespace=~"$namespace"' in selector.group(1), name

    def test_promtool_parses_every_query(self, tmp_path: Path) -> None:
        """Every panel query, variables filled in as Grafana does, is valid PromQL."""
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (Debian package prometheus; .ci/run does)")
        rules = [
            {"record": f"dashboard:query_{i}", "expr": concrete(q)}
            for i, (_, q) in enumerate(panel_queries() + variable_selectors())
        ]
        (tmp_path / "queries.yaml").write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
        )
        result = subprocess.run(
            [promtool, "check", "rules", "queries.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_the_parser_finds_metrics_and_labels(self) -> None:
        """The query reader used below sees metrics, matchers and groupings, not functions."""
        selectors, grouped = parse(
            'histogram_quantile(0.5, sum by (route, le) (rate(m_bucket{a="x", b=~"$v"}[5m])))'
            ' / on (pod) group_left x unless y{c!="1"} offset 1h > bool 0'
        )
        assert selectors == [("m_bucket", {"a", "b"}), ("x", set()), ("y", {"c"})]
        assert grouped == {"route", "le", "pod"}


# -- against a running daemon ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exposition(
    dev_vault: DevVault, sandbox_server: tuple[ServerThread, SandboxState]
) -> Iterator[dict[str, set[str]]]:
    """{sample name: its label names} from a daemon that did a bit of everything."""
    exchange, state = sandbox_server
    state.reset()
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    root = dev_vault.root_token.reveal()
    # A short, renewable token: the daemon renews it within seconds.
    answer = httpx.post(
        f"{dev_vault.addr}/v1/auth/token/create",
        headers={"X-Vault-Token": root},
        json={"policies": ["root"], "ttl": "3s", "renewable": True},
    )
    answer.raise_for_status()
    env = {
        "VAULT_ADDR": dev_vault.addr,
        "VAULT_TOKEN": answer.json()["auth"]["client_token"],
        "BACKPACK_VAULT_KV_PREFIX": prefix,
        "BACKPACK_VAULT_GRANT_PREFIX": f"{prefix}-broker",
        "BACKPACK_VAULT_BACKPACK_URL": exchange.url,
        "BACKPACK_VAULT_CHECK_INTERVAL": "1",
        "BACKPACK_VAULT_LEASE_TTL": "2",
    }
    admin_settings = load({**env, "VAULT_TOKEN": root})
    admin = Vault(admin_settings.vault)
    admin.login()
    pair = store_key(admin, REF, exchange=exchange.url)
    with httpx.Client(base_url=exchange.url, timeout=5.0) as http:
        SandboxAdmin(http).register(pair.api_key)
    daemon = Daemon(load(env), key_sync_interval_s=0.3, confirm_delay_s=0.1, renew_interval_s=0.2)
    daemon.start()
    try:
        with ServerThread(daemon.app) as server:

            def scrape() -> dict[str, set[str]]:
                found: dict[str, set[str]] = {}
                text = httpx.get(f"{server.url}/metrics").text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        found.setdefault(sample.name, set()).update(sample.labels)
                return found

            wait_until(lambda: "backpack_vault_checks_total" in scrape(), 15, "a check")
            headers = {"X-Vault-Token": root}
            url = f"{server.url}/v1/keys/{REF}"
            assert httpx.post(f"{url}/copy", headers=headers).status_code == 200
            signed = httpx.post(
                f"{url}/sign", headers=headers, json={"instruction": "accountQuery"}
            )
            assert signed.status_code == 200
            httpx.post(f"{url}/report", headers=headers, json={})
            # A rotation (keys rotate, then the successor registered): the daemon switches.
            successor = generate_pair()
            admin.store_next(
                REF,
                NextKey(
                    api_key=successor.api_key,
                    role=Role.SUCCESSOR,
                    state=NextState.PENDING,
                    read_only=False,
                    origin="generated",
                    created_at=now_iso(),
                ),
                successor.secret,
            )
            with httpx.Client(base_url=exchange.url, timeout=5.0) as http:
                SandboxAdmin(http).register(successor.api_key)
            wait_until(lambda: "backpack_vault_key_switches_total" in scrape(), 15, "a key switch")
            wait_until(
                lambda: "backpack_vault_vault_token_renewals_total" in scrape(),
                15,
                "a token renewal",
            )
            yield scrape()
    finally:
        daemon.stop()
        admin.close()
        state.reset()


def missing(query: str, exported: dict[str, set[str]]) -> list[str]:
    """What a query names that the daemon does not export."""
    selectors, grouped = parse(concrete(query) if "$" in query else query)
    problems = []
    available = set(TARGET_LABELS)
    for name, labels in selectors:
        if name not in exported:
            problems.append(f"metric {name}")
            continue
        available |= exported[name]
        problems += [
            f"label {name}{{{label}}}" for label in labels - exported[name] - TARGET_LABELS
        ]
    problems += [f"grouping label {label}" for label in grouped - available]
    return problems


@pytest.mark.slow
class TestAgainstARunningDaemon:
    @pytest.mark.parametrize("query", all_queries())
    def test_every_metric_and_label_queried_is_exported(
        self, query: str, exposition: dict[str, set[str]]
    ) -> None:
        """Each metric a panel, a variable or an alert queries is in a live scrape (a
        histogram as _bucket, _sum or _count), with the labels the query uses."""
        assert missing(query, exposition) == []

    def test_the_check_reads_nothing_that_is_not_there(
        self, exposition: dict[str, set[str]]
    ) -> None:
        """The same check fails on a metric or a label the daemon does not have."""
        assert missing('backpack_vault_no_such_metric{namespace=~".*"}', exposition)
        assert missing('backpack_vault_api_request_seconds_bucket{status="200"}', exposition)
        assert missing("sum by (no_such_label) (backpack_vault_checks_total)", exposition)
        assert not missing("sum by (key, verdict) (backpack_vault_checks_total)", exposition)
