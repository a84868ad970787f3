"""``python -m torchkeep``: the command line."""

from torchkeep.cli.main import main

raise SystemExit(main())
