"""Claims: reserve units of a node's free capacity (``docs/claims.md``).

:mod:`resolver.claims.model` (values and errors, no I/O), :mod:`resolver.claims.service`
(claim, release, list, reconcile; no HTTP), :mod:`resolver.claims.tokens` (API tokens),
:mod:`resolver.claims.http` (routes) and :mod:`resolver.claims.client` (HTTP client).
"""
