"""An app module whose import fails: the CLI must say so in one line (see
test_worker_process.test_cli_bad_input_is_one_line)."""

raise RuntimeError("this module fails on purpose when imported")
