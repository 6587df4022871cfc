"""Targets from the configuration: one per ``[[notify]]`` entry, each with a distinct name."""

from __future__ import annotations

from mxspool.config import Config
from mxspool.notify.mail import EmailTarget
from mxspool.notify.targets import Target, read_secret
from mxspool.notify.webhook import WebhookTarget


def build_targets(config: Config) -> list[Target]:
    """One target per ``[[notify]]`` entry; ConfigError when a secret_file is unusable."""
    targets: list[Target] = []
    names: set[str] = set()
    for entry in config.notify:
        threshold = entry.backlog_threshold or config.notifications.backlog_threshold
        target: Target
        if entry.url:
            target = WebhookTarget(entry, read_secret(entry), threshold)
        else:
            target = EmailTarget(entry, config, threshold)
        base, number = target.name, 2
        while target.name in names:  # names label metrics: keep them apart
            target.name = f"{base}#{number}"
            number += 1
        names.add(target.name)
        targets.append(target)
    return targets
