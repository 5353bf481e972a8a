"""The auditor's side of the resolver (``docs/audit.md``); trusts only the anchors.

:mod:`resolver.audit.bundle` verifies one served bundle offline,
:mod:`resolver.audit.sweep` sweeps the whole index (with the replica's verification
pool, :mod:`resolver.verify`), :mod:`resolver.audit.logcheck` checks the transparency
log against a stored checkpoint, and :mod:`resolver.audit.log` is the log view the
resolver serves (checkpoints, proofs, entries).
"""
