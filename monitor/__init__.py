"""Live monitoring, alerts, steering and the ``emoprobe`` CLI.

Imports are lazy so ``monitor.cli`` and ``monitor.rules`` load without torch."""
from importlib import import_module

_EXPORTS = {"EmotionMonitor": "live", "Trace": "live", "parse_rule": "rules", "all_of": "rules", "any_of": "rules",
            "Alert": "rules", "Rule": "rules", "find_alerts": "rules"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
