import sys

from taskservice.cli import main

sys.exit(main())
