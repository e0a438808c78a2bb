"""`reco` subcommands, one module per noun (a long noun across two); app/cli.py registers them."""
