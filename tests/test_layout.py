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


def _sections():
    """(line -> section number) and {top-level name: section number}."""
    lines = SOURCE.splitlines()
    banners = [(i + 1, int(m.group(1))) for i, line in enumerate(lines)
               for m in [re.match(r"^# (\d+)\. ", line)] if m]

    def section(lineno):
        found = 0
        for line, number in banners:
            if line <= lineno:
                found = number
        return found
    defined = {}
    for node in ast.parse(SOURCE).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            names = []
        for name in names:
            defined.setdefault(name, section(node.lineno))
    return section, defined


def test_nothing_is_used_above_its_section():
    # Sections stand in dependency order: a section uses only what stands
    # above it (or in itself), so the file reads top to bottom.
    section, defined = _sections()
    offenders = set()
    for node in ast.parse(SOURCE).body:
        own = section(node.lineno)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) \
                    and defined.get(sub.id, 0) > own:
                offenders.add("%s (section %d) uses %s (section %d)" % (
                    getattr(node, "name", "line %d" % node.lineno), own, sub.id, defined[sub.id]))
    assert sorted(offenders) == []


def test_no_function_is_longer_than_a_screen():
    long_ones = ["%s (line %d): %d lines" % (node.name, node.lineno, node.end_lineno - node.lineno + 1)
                 for node in ast.walk(ast.parse(SOURCE))
                 if isinstance(node, ast.FunctionDef)
                 and getattr(node, "end_lineno", None)            # 3.8+
                 and node.end_lineno - node.lineno + 1 > 60]
    assert long_ones == []


def test_every_row_of_the_failure_model_names_tests_that_exist():
    # README "Behaviour under failure": each rule names the test files that
    # hold it; a renamed or emptied file must not leave a row unproven.
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    section = text.split("### Behaviour under failure", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 12, rows
    for row in rows:
        for name in re.findall(r"`(tests/[a-z_0-9/]+\.py)`", row):
            path = os.path.join(ROOT, name)
            assert os.path.isfile(path), (name, row)
            with open(path) as handle:
                assert re.search(r"^def test_|\(\"file-", handle.read(), re.M), (name, row)


def test_no_test_file_imports_another():
    # What tests share lives in conftest.py (fixtures) or tests/support/
    # (helpers), never in a test file another one imports: a test file can be
    # renamed, split or run alone.
    tests_dir = os.path.join(ROOT, "tests")
    paths = [os.path.join(tests_dir, name) for name in os.listdir(tests_dir)]
    paths += [os.path.join(tests_dir, "support", name)
              for name in os.listdir(os.path.join(tests_dir, "support"))]
    offenders = []
    for path in sorted(p for p in paths if p.endswith(".py")):
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + ["%s.%s" % (node.module, a.name) for a in node.names]
            else:
                continue
            offenders += ["%s imports %s" % (os.path.relpath(path, ROOT), name) for name in names
                          if name.split(".")[0].startswith("test_")
                          or name.rsplit(".", 1)[-1].startswith("test_")]
    assert offenders == []
