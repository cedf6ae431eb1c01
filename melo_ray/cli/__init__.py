"""The `melo-ray` command line: `main.py` (edit, generate, eval, serve, data, job) and `demo.py`."""
