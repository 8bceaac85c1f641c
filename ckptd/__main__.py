"""`python -m ckptd`: the `ckptd` command."""

from ckptd.daemon.cli import main

main()
