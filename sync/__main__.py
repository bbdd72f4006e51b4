"""`python -m sync ...`: see sync/cli.py."""
from sync.cli import main

raise SystemExit(main())
