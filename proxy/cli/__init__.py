"""The ``deltaproxy`` command line: :mod:`.parser` (every option, argparse only),
:mod:`.main` (dispatch and exit codes), and one module per command (:mod:`.serve`,
:mod:`.train`, :mod:`.batch`, :mod:`.redact`, :mod:`.threshold`, :mod:`.audit`,
:mod:`.log_keys`) with :mod:`.common` for what they share.

The top layer: it may import every other part of :mod:`proxy` (training included), and
nothing imports it."""
