"""Rewrite the README's config tables from the agent's key declarations.

    python3 tests/readme_tables.py

The tables sit between ``<!-- keys: BLOCK -->`` and ``<!-- /keys -->``; the
agent prints them with ``--config-reference`` and
test_config_schema.test_readme_tables_are_the_key_tables keeps them equal. A
block the README does not have yet (a new storage) gets a heading and its
table after the last table, so nobody inserts markers by hand.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_RE = re.compile(r"<!-- keys: (.*?) -->\n.*?<!-- /keys -->", re.S)


def main():
    reference = subprocess.check_output([sys.executable, os.path.join(ROOT, "vault_snapshot_agent.py"),
                                         "--config-reference"]).decode("utf-8")
    blocks = dict((m.group(1), m.group(0)) for m in BLOCK_RE.finditer(reference))
    path = os.path.join(ROOT, "README.md")
    with open(path) as handle:
        text = handle.read()
    present = set(m.group(1) for m in BLOCK_RE.finditer(text))
    missing = "".join("\n### `%s`\n\n%s\n" % (title, block) for title, block in blocks.items()
                      if title not in present)
    text = BLOCK_RE.sub(lambda m: blocks[m.group(1)], text)
    if missing:
        end = text.rindex("<!-- /keys -->") + len("<!-- /keys -->\n")
        text = text[:end] + missing + text[end:]
    with open(path, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
