"""docs/alerts.yml names only metrics mxspool exports (a renamed metric would silence a rule)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from mxspool import metrics

RULES = Path(__file__).parent.parent / "docs" / "alerts.yml"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _exported() -> set[str]:
    text = generate_latest(metrics.REGISTRY).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_metric_in_the_alert_rules_is_exported() -> None:
    exported = _exported()
    used = set(re.findall(r"\b(mxspool_[a-z0-9_]+)", RULES.read_text()))
    assert len(used) >= 10  # positive control: the scan finds the rules' metrics
    missing = sorted(name for name in used if name not in exported and _base(name) not in exported)
    assert missing == []


def test_the_check_catches_an_unknown_name() -> None:
    exported = _exported()
    assert "mxspool_no_such_metric" not in exported
    assert _base("mxspool_destination_dead") in exported
