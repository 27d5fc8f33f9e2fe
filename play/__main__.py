"""``python -m play``: see play/cli.py for the options."""

import sys

from play.cli import main

if __name__ == "__main__":
    sys.exit(main())
