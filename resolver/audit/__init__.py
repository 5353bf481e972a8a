"""The auditor's side of the resolver (``docs/audit.md``).

:mod:`resolver.audit.sweep` verifies bundles offline and sweeps the whole index;
:mod:`resolver.audit.log` serves the transparency log's view (checkpoints, proofs).
"""
