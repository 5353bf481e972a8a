"""The resolver's DNS front end (``docs/dns.md``).

:mod:`resolver.dns.answerer` turns query bytes into answer bytes with no I/O;
:mod:`resolver.dns.server` runs it over UDP and TCP.
"""
