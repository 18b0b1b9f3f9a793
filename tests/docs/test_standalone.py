"""The repository stands alone: no tracked file points at the specification,
notes or style files the project was started from, which live outside the
repository, next to it. docs/ is the reference; a comment or
doc that needs a fact states it or points into docs/ (docs/README.md).

Every tracked file is read (`git ls-files`; node_modules is never tracked and
is skipped if it is), text or not."""

import os
import re
import subprocess
import unittest

SRC = os.environ.get("HUB_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    "CONTR" + "ACT",
    r"NOTES\." + "md",
    r"STYLE\." + "md",
    r"\.\./" + "shared",
]))


def tracked_files():
    out = subprocess.run(["git", "-C", SRC, "ls-files", "-z"], capture_output=True,
                         timeout=60, check=True).stdout
    return [p for p in out.decode().split("\0")
            if p and "node_modules/" not in p and not p.startswith("node_modules")]


def references(paths):
    hits = []
    for rel in paths:
        full = os.path.join(SRC, rel)
        if not os.path.isfile(full):
            continue  # deleted in the work tree
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        for no, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{no}: {line.strip()[:160]}")
    return hits


class Standalone(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            cls.files = tracked_files()
        except (OSError, subprocess.SubprocessError) as e:
            raise unittest.SkipTest(f"not a git checkout ({e}): nothing to list") from e

    def test_no_reference_outside_the_repository(self):
        paths = self.files
        self.assertGreater(len(paths), 50)
        hits = references(paths)
        self.assertEqual(hits, [], "references to files outside the repository:\n" +
                         "\n".join(hits))


if __name__ == "__main__":
    unittest.main(verbosity=2)
