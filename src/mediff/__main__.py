"""``python -m mediff`` (also what ``torchrun -m mediff train ...`` runs)."""

from mediff.cli import main

main()
