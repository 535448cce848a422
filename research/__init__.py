"""Research code of the repository, outside the installed package: how the toy world's model was trained.

Run from the repository root (``python -m research.toyworld_training --help``); see ``research/README.md``.
"""
