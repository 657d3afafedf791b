"""Handler kinds: what a service does with a connection once its name is read.

Each kind is one class (:class:`~tcpmuxd.tcpmux.handlers.base.Handler`) in a module of its
own: its keys and their checks, how it describes itself, how it starts in the long-running
daemon and how it runs in place in an Accept=yes instance. :data:`KINDS` is the list the rest
of tcpmuxd goes by: the service-file schema (config.py) takes its keys from here, the daemon
(dispatch.py) and the Accept=yes instance (inetd.py) call the kind a service has, and none of
them names a kind. A new kind is a module here, its class in :data:`KINDS`, its keys in
tcpmuxd.conf(5), and its tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tcpmuxd.common.dropins import KeySpec
from tcpmuxd.tcpmux.handlers.base import Handler, StartError, oserror_text
from tcpmuxd.tcpmux.handlers.exec import Exec
from tcpmuxd.tcpmux.handlers.forward import Forward
from tcpmuxd.tcpmux.handlers.passto import PassTo
from tcpmuxd.tcpmux.handlers.unit import Unit

__all__ = ["KEYS", "KINDS", "SELECTORS", "Exec", "Forward", "Handler", "PassTo", "StartError",
           "Unit", "oserror_text"]

#: Every handler kind, in the order messages list them.
KINDS: tuple[type[Handler], ...] = (Exec, Forward, PassTo, Unit)

#: The key that selects each kind -> the kind's name (``{"Exec": "exec", ...}``).
SELECTORS: Mapping[str, str] = MappingProxyType({cls.key: cls.kind for cls in KINDS})


def _keys() -> dict[str, KeySpec]:
    """Every kind's keys, each marked with the kinds that read it (a key several kinds read,
    such as ConnectTimeoutSec=, must be the same KeySpec in each)."""
    specs: dict[str, KeySpec] = {}
    kinds: dict[str, list[str]] = {}
    for cls in KINDS:
        assert next(iter(cls.keys)) == cls.key, f"{cls.__name__}: its own key comes first"
        for key, spec in cls.keys.items():
            assert specs.setdefault(key, spec) is spec, f"{key}= is read two ways"
            kinds.setdefault(key, []).append(cls.kind)
    return {key: KeySpec(spec.parse, tuple(kinds[key]), spec.is_list)
            for key, spec in specs.items()}


#: The handler keys of a service file, for config.py's key table.
KEYS: Mapping[str, KeySpec] = MappingProxyType(_keys())
