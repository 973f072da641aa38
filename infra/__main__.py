"""`python -m infra ...` is the `infra` console script."""

from infra.cli import run_and_exit

run_and_exit()
