"""The demo's terminal shows its own lines; library output from Python, C-level writes, logging and
warnings goes to the log file."""
import logging
import os
import subprocess
import sys
import warnings

from melo_ray.cli.quiet import library_output_to


def test_library_output_goes_to_the_log_and_our_lines_to_the_terminal(tmp_path, capfd):
    log_file = tmp_path / "out" / "demo.log"
    with library_output_to(log_file) as terminal:
        print("from a library's print")
        os.write(2, b"from C on stderr\n")
        subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
        logging.getLogger("a.library").warning("from a library's logger")  # propagates to the root logger
        warnings.warn("a deprecation", FutureWarning)
        print("our own line", file=terminal)
    print("after: the terminal again")
    shown = capfd.readouterr()
    logged = log_file.read_text()
    assert "our own line" in shown.out and "after: the terminal again" in shown.out
    for noise in ("from a library's print", "from C on stderr", "from a child process", "from a library's logger",
                  "a deprecation"):
        assert noise in logged and noise not in shown.out + shown.err
    assert logging.getLogger().handlers == [] or all(
        not isinstance(h, logging.FileHandler) or h.baseFilename != str(log_file) for h in logging.getLogger().handlers)
