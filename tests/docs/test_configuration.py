"""docs/configuration.md lists every configuration key with the default and
range hub/config.c gives it, and nothing else; `iot-hub --help` and
deploy/iot-hub.conf agree on the keys and defaults. See that page's
"Keeping this page right"."""

import os
import re
import subprocess
import unittest

SRC = os.environ.get("HUB_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
HUB_BIN = os.environ.get("HUB_BIN") or os.path.join(SRC, "build", "iot-hub")

# O("name", OPT_TYPE, field, "default" | NULL, min, max, "help")
OPT_RE = re.compile(r'O\("([a-z0-9-]+)", (OPT_[A-Z]+), \w+, (NULL|"[^"]*"), ([^,]+), ([^,]+), "')


def read(rel):
    with open(os.path.join(SRC, rel), encoding="utf-8") as f:
        return f.read()


def config_c():
    """{key: (type, default or None, min, max)} from hub/config.c's table."""
    keys = {}
    for m in OPT_RE.finditer(read("hub/config.c")):
        name, typ, dflt, lo, hi = m.groups()
        keys[name] = (typ, None if dflt == "NULL" else dflt.strip('"'),
                      float(lo), float(hi))
    return keys


def doc_rows():
    """{key: (default or None, range text)} from the tables under "## Keys"."""
    text = read("docs/configuration.md")
    start = text.index("\n## Keys\n")
    end = text.index("\n## ", start + 1)
    rows = {}
    for line in text[start:end].splitlines():
        m = re.match(r"\| `([a-z0-9-]+)` \| ([^|]*) \| ([^|]*) \|", line)
        if not m:
            continue
        name, dflt, rng = (g.strip() for g in m.groups())
        if name in rows:
            raise AssertionError(f"docs/configuration.md: {name} has two rows")
        rows[name] = (None if dflt == "unset" else dflt.strip("`"), rng)
    return rows


class ConfigurationDoc(unittest.TestCase):
    def setUp(self):
        self.c = config_c()
        self.assertGreater(len(self.c), 40, "hub/config.c's options table was not parsed")

    def test_every_key_has_a_row_with_its_default_and_range(self):
        rows = doc_rows()
        missing = sorted(set(self.c) - set(rows))
        unknown = sorted(set(rows) - set(self.c))
        self.assertEqual(missing, [], "keys of hub/config.c without a row in docs/configuration.md")
        self.assertEqual(unknown, [], "rows of docs/configuration.md naming no key of hub/config.c")
        for name, (typ, dflt, lo, hi) in self.c.items():
            doc_dflt, rng = rows[name]
            self.assertEqual(doc_dflt, dflt, f"default of {name}")
            if typ == "OPT_STR":
                self.assertEqual(rng, "", f"{name} is a string: no range")
                continue
            parts = rng.split("–")
            self.assertEqual(len(parts), 2, f"range of {name}: {rng!r} is not 'min–max'")
            self.assertEqual((float(parts[0]), float(parts[1])), (lo, hi), f"range of {name}")

    def test_help_lists_the_same_keys_and_defaults(self):
        if not os.access(HUB_BIN, os.X_OK):
            self.fail(f"HUB_BIN not built: {HUB_BIN}")
        out = subprocess.run([HUB_BIN, "--help"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        helped = {}
        for line in out.splitlines():
            m = re.match(r"  --([a-z0-9-]+) +(.*)$", line)
            if m:
                d = re.search(r" \[([^\]]*)\]$", m.group(2))
                helped[m.group(1)] = d.group(1) if d else None
        self.assertEqual(sorted(helped), sorted(self.c))
        for name, (_, dflt, _, _) in self.c.items():
            self.assertEqual(helped[name], dflt, f"--help default of {name}")

    def test_example_config_file_has_every_key(self):
        """Every key is in deploy/iot-hub.conf (the shipped production
        config). A key set to something else than its default says so in
        the comment just above it: "(default: <default>)", "(default:
        unset)" for a string key without one."""
        seen, noted, comment = {}, {}, []
        for line in read("deploy/iot-hub.conf").splitlines():
            stripped = line.strip()
            m = re.match(r"^(#\s*)?([a-z0-9-]+)(?:\s+(.*))?$", stripped)
            if not m or m.group(2) not in self.c:
                if stripped.startswith("#"):
                    comment.append(stripped)
                elif not stripped:
                    comment = []
                continue
            commented, name, value = m.groups()
            if commented and value and " " in value:
                comment.append(stripped)
                continue  # prose that starts with a key's name
            d = re.search(r"\(default: ([^),]*)[),]", " ".join(c.lstrip("# ") for c in comment))
            noted[name] = d.group(1).strip() if d else None
            comment = []
            if commented:
                seen.setdefault(name, None)  # "# key" or "# key example": unset
            else:
                seen[name] = value
        self.assertEqual(sorted(set(self.c) - set(seen)), [],
                         "keys missing from deploy/iot-hub.conf")
        for name, (_, dflt, _, _) in self.c.items():
            if seen[name] == dflt:
                continue
            self.assertEqual(noted[name], dflt if dflt is not None else "unset",
                             f"deploy/iot-hub.conf sets {name} to {seen[name]!r}, not its default "
                             f"{dflt!r}: the comment above it must say (default: ...)")
            if seen[name] is not None and "/" in seen[name] and name in ("schemas", "data-dir",
                                                                        "jwt-key", "api-keys",
                                                                        "web-root", "tls-cert",
                                                                        "tls-key", "tls-client-ca"):
                self.assertTrue(seen[name].startswith("/"),
                                f"deploy/iot-hub.conf: {name} must be an absolute path")

if __name__ == "__main__":
    unittest.main(verbosity=2)
