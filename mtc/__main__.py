"""``python -m mtc``: the ``mtc`` command (what ``torchrun -m mtc`` runs on every rank)."""

from mtc.cli import run

run()
