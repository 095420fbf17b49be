"""One module per `mixer` subcommand; see `mlpmixer.cli`."""
