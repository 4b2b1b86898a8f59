"""One module per `mm-llama` command: `configure(parser)` and `run(args) -> int`."""
