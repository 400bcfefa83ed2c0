"""The base class of dkacq's own errors: the ones the ``dkacq`` command reports in one line."""


class DkacqError(Exception):
    """Bad input or options, a missing or damaged file, an unavailable model: the user can fix it from the message.

    The ``dkacq`` command prints such an error as ``dkacq: error: <message>`` on one line, without a
    traceback, and exits with status 2 (``--debug`` or ``DKACQ_DEBUG=1`` shows the traceback). Its message
    is therefore one line that names what is wrong and, where it can, what to do. Any other exception is
    a bug and keeps its traceback.
    """
