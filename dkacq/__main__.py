"""``python -m dkacq``: the ``dkacq`` command."""

from dkacq.cli import console

if __name__ == "__main__":
    console()
