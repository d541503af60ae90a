"""``python -m ddpm_lib train|sample|eval``: see ``ddpm_lib.cli``."""

from ddpm_lib.cli import main

raise SystemExit(main())
