"""Command groups of the ``cpi`` CLI, in the order ``cpi --help`` lists them."""

from cpi.commands import (
    agent,
    audit,
    ca,
    claim,
    completion,
    demo,
    ident,
    keygen,
    log,
    lookup,
    ns,
    registry,
    resolver,
    up,
    usage,
    verify,
)

COMMAND_MODULES = (
    up,
    demo,
    keygen,
    ident,
    verify,
    ca,
    ns,
    registry,
    agent,
    resolver,
    lookup,
    claim,
    usage,
    log,
    audit,
    completion,
)
