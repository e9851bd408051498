"""`python -m chatrt`: the `chatrt` command."""

from chatrt.cli import main

raise SystemExit(main())
