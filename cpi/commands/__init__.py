"""Command groups of the ``cpi`` CLI, in the order ``cpi --help`` lists them."""

from cpi.commands import demo, ident, keygen, verify

COMMAND_MODULES = (demo, keygen, ident, verify)
