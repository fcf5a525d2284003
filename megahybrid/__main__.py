import sys

from megahybrid.cli import main

sys.exit(main())
