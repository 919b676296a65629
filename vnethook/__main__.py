import sys

from vnethook.cli import main

sys.exit(main())
