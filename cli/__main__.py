"""``python -m cli VERB ...``: the ``vismem`` command without its console script."""
from cli.main import run

run()
