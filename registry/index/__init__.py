"""The national index: the one package that talks to etcd and the one that builds keys.

Everything else in the project goes through it.  One module per job:

* :mod:`~registry.index.layout`: the key layout of docs/protocol.md §6 (:class:`Prefix`,
  :class:`Keys`, :func:`parse_key`) and the one reader and writer of ``/alloc/`` and
  ``/holders/`` values (:func:`read_units`, :func:`units_json`);
* :mod:`~registry.index.values`: what calls take and return (:class:`KV`,
  :class:`Cmp`, :class:`Op`, :class:`TxnResult`, :class:`WatchEvent`,
  :class:`Compacted`, ...) and the index's own errors;
* :mod:`~registry.index.client`: :class:`Index`, a typed facade over etcd with a
  timeout on every call, the connection (endpoints, TLS, auth) and the mapping of etcd
  and gRPC errors onto :mod:`schemas.errors`;
* :mod:`~registry.index.lease`: :class:`Lease`, a handle with a keep-alive task that
  notices loss;
* :mod:`~registry.index.watch`: :class:`Watch`, which resumes from the last delivered
  revision and reports compaction;
* :mod:`~registry.index.settings`: :class:`EtcdSettings`, the ``etcd`` section of the
  service configs, and the environment that overrides it;
* :mod:`~registry.index.auth`: the etcd roles of the components (who may read and
  write which prefixes); :class:`Index` has the calls that set users and roles up;
* :mod:`~registry.index.maintenance`: :class:`Maintainer`, compaction,
  defragmentation one member at a time and the NOSPACE alarm.

``from registry.index import X`` works for every public name.  ``layout`` and
``values`` import neither gRPC nor the etcd client, and neither does importing this
package: the names of ``client``, ``lease``, ``watch``, ``settings`` and
``maintenance`` are loaded on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from registry.index.layout import ROOT, Keys, ParsedKey, Prefix, parse_key, read_units, units_json
from registry.index.values import (
    KV,
    CasResult,
    Cmp,
    Compacted,
    IndexAccessDeniedError,
    IndexCompactedError,
    IndexRejectedError,
    KVPage,
    Member,
    MemberStatus,
    Op,
    OpResult,
    TxnResult,
    WatchEvent,
)

if TYPE_CHECKING:
    from registry.index.client import Index
    from registry.index.lease import Lease
    from registry.index.maintenance import Maintainer
    from registry.index.settings import (
        ENV_ETCD_CACERT,
        ENV_ETCD_CERT,
        ENV_ETCD_ENDPOINTS,
        ENV_ETCD_ENDPOINTS_ALIAS,
        ENV_ETCD_KEY,
        ENV_ETCD_PASSWORD,
        ENV_ETCD_PASSWORD_FILE,
        ENV_ETCD_USER,
        EtcdSettings,
        endpoints_from_env,
    )
    from registry.index.watch import Watch

__all__ = [
    "ENV_ETCD_CACERT",
    "ENV_ETCD_CERT",
    "ENV_ETCD_ENDPOINTS",
    "ENV_ETCD_ENDPOINTS_ALIAS",
    "ENV_ETCD_KEY",
    "ENV_ETCD_PASSWORD",
    "ENV_ETCD_PASSWORD_FILE",
    "ENV_ETCD_USER",
    "KV",
    "ROOT",
    "CasResult",
    "Cmp",
    "Compacted",
    "EtcdSettings",
    "Index",
    "IndexAccessDeniedError",
    "IndexCompactedError",
    "IndexRejectedError",
    "KVPage",
    "Keys",
    "Lease",
    "Maintainer",
    "Member",
    "MemberStatus",
    "Op",
    "OpResult",
    "ParsedKey",
    "Prefix",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "endpoints_from_env",
    "parse_key",
    "read_units",
    "units_json",
]

_LAZY: dict[str, str] = {
    "Index": "client",
    "Lease": "lease",
    "Maintainer": "maintenance",
    "Watch": "watch",
    "EtcdSettings": "settings",
    "ENV_ETCD_CACERT": "settings",
    "ENV_ETCD_CERT": "settings",
    "ENV_ETCD_KEY": "settings",
    "ENV_ETCD_ENDPOINTS": "settings",
    "ENV_ETCD_ENDPOINTS_ALIAS": "settings",
    "ENV_ETCD_PASSWORD": "settings",
    "ENV_ETCD_PASSWORD_FILE": "settings",
    "ENV_ETCD_USER": "settings",
    "endpoints_from_env": "settings",
}


def __getattr__(name: str) -> Any:
    """Load the names of the modules that import gRPC and the etcd client on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
