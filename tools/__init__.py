"""Benchmarks, studies and scripts of wf-data (not shipped in the wheel).

Each runs as a script (`uv run python tools/bench.py`) or a module (`uv run python -m
tools.bench`); they import each other as `tools.<module>` (the project root is on the path of
the project's environment), never by editing `sys.path`.
"""
