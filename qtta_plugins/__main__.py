"""``python -m qtta_plugins``: the ``qtta`` command (:mod:`qtta_plugins.app.cli`)."""

from .app.cli import main

raise SystemExit(main())
