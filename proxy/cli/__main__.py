"""``python -m proxy.cli``: the ``deltaproxy`` command."""

import sys

from proxy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
