import sys

from beam_curator.cli import main

sys.exit(main())
