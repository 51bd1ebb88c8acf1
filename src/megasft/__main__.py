import sys

from megasft.cli import main

sys.exit(main())
