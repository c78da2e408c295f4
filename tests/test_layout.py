"""The file's shape (STYLE.md): the docstring's table of contents matches the
numbered section banners, imports are the standard library's, and time and
sleeping only come from the injected clock and signals."""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = open(os.path.join(ROOT, "vault_snapshot_agent.py")).read()


def test_docstring_table_of_contents_matches_the_banners():
    banners = re.findall(r"^# (\d+)\. (.+)$", SOURCE, flags=re.M)
    toc = re.findall(r"^    (\d+)\. (.+)$", ast.get_docstring(ast.parse(SOURCE)), flags=re.M)
    assert banners == toc
    assert [int(n) for n, _ in banners] == list(range(1, len(banners) + 1))


def test_only_standard_library_imports():
    names = set()
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:     # before 3.10: everything imported must import here
        for name in names:
            __import__(name)
    else:
        assert names <= set(stdlib) | {"__future__"}, names - set(stdlib)


def test_time_comes_from_the_clock():
    # Only the Clock, the Signals' heartbeat and the watchdog thread may read time directly.
    offenders = [line.strip() for line in SOURCE.splitlines()
                 if re.search(r"time\.sleep\(|datetime\.utcnow\(|time\.time\(\)", line)]
    assert offenders == []
