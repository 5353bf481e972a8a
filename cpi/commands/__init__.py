"""Command groups of the ``cpi`` CLI, in the order ``cpi --help`` lists them."""

from cpi.commands import (
    agent,
    audit,
    ca,
    claim,
    completion,
    demo,
    endorse,
    ident,
    keygen,
    log,
    lookup,
    ns,
    registry,
    resolver,
    up,
    verify,
)

COMMAND_MODULES = (
    up,
    demo,
    keygen,
    ident,
    verify,
    ca,
    endorse,
    ns,
    registry,
    agent,
    resolver,
    lookup,
    claim,
    log,
    audit,
    completion,
)
