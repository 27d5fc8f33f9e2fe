import sys

from train.evaluate.cli import main

sys.exit(main())
