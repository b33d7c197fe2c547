"""``python -m acall`` runs the command line (see :mod:`acall.cli`)."""

from acall.cli import main

raise SystemExit(main())
