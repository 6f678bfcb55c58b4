"""``python -m distfork`` is the ``distfork`` command."""

from .cli import main

main()
