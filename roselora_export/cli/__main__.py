"""`python -m roselora_export.cli ...`, the same as the `roselora-export` console script."""
from . import main

main(prog_name="roselora-export")
