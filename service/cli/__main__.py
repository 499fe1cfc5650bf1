"""`python -m service.cli ...` is the `bisenet` command, for machines where it is not installed."""

from . import main

raise SystemExit(main())
