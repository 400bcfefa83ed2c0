"""One module per ``dkacq`` command; each exposes ``run(args)``."""
