"""``python -m bastionmq``: the ``bastionmq`` command."""

from bastionmq.cli import main

main(prog_name="bastionmq")
