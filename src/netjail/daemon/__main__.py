"""``python -m netjail.daemon``: the same as ``netjaild``."""

from netjail.daemon.main import main

main()
