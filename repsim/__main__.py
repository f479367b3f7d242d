import sys

from repsim.cli import main

sys.exit(main())
