"""`python -m diode` entry point."""

from diode.cli import main

raise SystemExit(main())
