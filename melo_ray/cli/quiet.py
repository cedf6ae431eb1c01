"""A command's own lines on the terminal, everything libraries print to a log file.

Ray, MLflow, transformers and tqdm write to the process's stdout and stderr from Python, from C and
from Ray's log forwarding, so redirecting `sys.stdout` is not enough: the two file descriptors
themselves point at the log file while the command runs, and the command writes its own lines to a
duplicate of the terminal's stdout taken before the switch."""
from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TextIO


@contextmanager
def library_output_to(log_file: Path) -> Iterator[TextIO]:
    """While inside: fds 1 and 2, Python logging and warnings go to `log_file`; yields the terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved_out), "wb", buffering=0), encoding="utf-8",
                                errors="replace", line_buffering=True)
    root = logging.getLogger()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_handlers, old_level = root.handlers[:], root.level
    with open(log_file, "ab", buffering=0) as sink, open(log_file, "a", encoding="utf-8", buffering=1) as text:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        root.handlers, root.level = [handler], logging.INFO
        logging.captureWarnings(True)
        try:
            # sys.stdout may not be fd 1 (a test runner's capture): Python-level writes are moved too
            with redirect_stdout(text), redirect_stderr(text), warnings.catch_warnings():
                warnings.simplefilter("default")
                yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.captureWarnings(False)
            root.handlers, root.level = old_handlers, old_level
            handler.close()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.flush()
            terminal.close()
