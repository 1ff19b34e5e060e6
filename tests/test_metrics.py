"""The daemon's metrics: what the README promises is what the registry holds."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from backpack_vault import __version__
from backpack_vault.core.keys import KeyRef
from backpack_vault.events import Cause, KeyRotated
from backpack_vault.metrics import Metrics

README = Path(__file__).resolve().parents[1] / "README.md"

_SUFFIX = {"counter": "_total"}


def _documented() -> dict[str, tuple[str, frozenset[str]]]:
    """metric name -> (type, labels) from the README's Metrics table."""
    section = README.read_text(encoding="utf-8").split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `(backpack_vault_\w+)` \| (\w+) \|\s*(.*?)\s*\|$", section, re.MULTILINE
    )
    return {name: (kind, frozenset(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def _registered(metrics: Metrics) -> dict[str, tuple[str, frozenset[str]]]:
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("backpack_vault_"):
            continue
        name = family.name + _SUFFIX.get(family.type, "")
        labels = {
            k for sample in family.samples for k in sample.labels if k not in ("le", "quantile")
        }
        found[name] = (family.type, frozenset(labels))
    return found


def _exercised() -> Metrics:
    """Every metric with at least one sample, so that labels show."""
    metrics = Metrics(CollectorRegistry())
    metrics.observe_request("copy", 200, 0.01)
    metrics.observe_copy("main/a", "ok")
    metrics.observe_signature("main/a", "orderExecute", "ok")
    metrics.observe_report("main/a", "ok")
    metrics.record_check("main/a", "VALID")
    metrics.observe_check(0.5, 12)
    metrics.set_key_status("main/a", "active")
    metrics.observe_renewal("renew", "ok")
    metrics.observe_revocations(1)
    metrics.track_outstanding(lambda: 0)
    metrics.on_event(
        KeyRotated(KeyRef("main", "a"), "old", "new", failover=False, cause=Cause.CHECK)
    )
    return metrics


class TestMetrics:
    def test_the_readme_table_is_the_registry(self) -> None:
        """Each documented metric exists with its type and labels, and nothing else does."""
        assert _registered(_exercised()) == _documented()

    def test_build_info_names_the_version(self) -> None:
        """build_info is 1, labelled with the package version."""
        text = _exercised().render()[0].decode()
        assert 'backpack_vault_build_info{python="' in text
        assert f'version="{__version__}"' in text

    def test_process_metrics_come_along_and_no_created_series(self) -> None:
        """process_* metrics are exported; counters have no _created series."""
        text = _exercised().render()[0].decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "process_cpu_seconds" in names or "process_cpu_seconds_total" in names
        assert "_created" not in text

    def test_check_timing_lands_in_histograms(self) -> None:
        """A check's duration and the clock offset it measured are histograms in seconds."""
        metrics = Metrics(CollectorRegistry())
        metrics.observe_check(1.5, -250)
        metrics.observe_check(0.2)
        text = metrics.render()[0].decode()
        assert "backpack_vault_check_duration_seconds_count 2.0" in text
        assert "backpack_vault_clock_offset_seconds_count 1.0" in text
        assert 'backpack_vault_clock_offset_seconds_bucket{le="-0.5"} 0.0' in text
        assert 'backpack_vault_clock_offset_seconds_bucket{le="-0.25"} 1.0' in text
