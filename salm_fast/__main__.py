"""``python -m salm_fast ...``: the ``salm-fast`` command line (:func:`salm_fast.cli.main`)."""
from .cli import main

raise SystemExit(main())
