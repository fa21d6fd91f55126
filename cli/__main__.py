"""``python -m cli VERB ...``: the ``vismem`` command without its console script."""
import sys

from cli.main import main

sys.exit(main())
