"""``python -m research.toyworld_training``: the trainer's command line (``cli.main``)."""

from .cli import main

main()
