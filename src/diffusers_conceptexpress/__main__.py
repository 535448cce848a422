"""``python -m diffusers_conceptexpress ...`` is ``conceptexpress ...`` (also under ``torchrun -m`` and
``accelerate launch -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
