"""`reco` subcommands that have a module of their own, one per noun (the rest are still in app/cli.py)."""
