"""Command groups of the ``cpi`` CLI, in the order ``cpi --help`` lists them."""

from cpi.commands import agent, ca, demo, ident, keygen, ns, registry, up, verify

COMMAND_MODULES = (up, demo, keygen, ident, verify, ca, ns, registry, agent)
