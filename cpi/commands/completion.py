"""``cpi completion bash|zsh``: print a shell completion script for the whole command tree.

The script is generated from the argparse tree by ``shtab`` (no code runs at completion
time, unlike ``argcomplete``, so completing stays instant and needs nothing on the
target but the shell).
"""

from __future__ import annotations

import argparse
import sys

SHELLS = ("bash", "zsh", "tcsh")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh)",
        description=(
            "Print the completion script for SHELL on stdout. bash: "
            "`source <(cpi completion bash)` (or save it as "
            "~/.local/share/bash-completion/completions/cpi); zsh: "
            "`cpi completion zsh > ~/.zfunc/_cpi` with ~/.zfunc in $fpath, then `compinit`."
        ),
    )
    p.add_argument("shell", choices=SHELLS, help="bash, zsh or tcsh")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import shtab

    from cpi.main import build_parser

    sys.stdout.write(shtab.complete(build_parser(environ={}), shell=args.shell))
    sys.stdout.write("\n")
    return 0
