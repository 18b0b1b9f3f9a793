"""The Python SDK (sdk/python/iothub_gw) against the real hub and Redis: the
scenarios of sdk/c/tests/test_sdk_c.py (kill -9 of the gateway and restart on
the same spool, hub killed and Redis frozen, rate limits and rejects, the
spool's bound, commands through the API, commands once across a reconnect and
a duplicate delivery), run on py_gw.py, plus the package installed with pip
into a venv."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("HUB_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(SOURCE, "sdk", "c", "tests"))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))

import harness as H  # noqa: E402
import test_sdk_c  # noqa: E402


class SdkPython(test_sdk_c.SdkC):
    GW_CMD = ["/usr/bin/python3", os.path.join(HERE, "py_gw.py")]
    SPOOL_FILES_MAX = 3   # spool.db, -wal, -shm

    def check_spool_size(self, spool, bound, n_accepted):
        # the bound counts the readings' JSON (about 60 bytes each here)
        self.assertLessEqual(n_accepted * 55, bound)
        self.assertGreater(n_accepted * 80, bound * 3 // 4)

    def test_pip_install(self):
        """pip install --no-build-isolation into a venv with the system's
        site packages (websockets from Debian), then import it."""
        venv = os.path.join(self.dir, "venv")
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv], check=True)
        r = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--no-build-isolation",
                            "--no-index", "--quiet", os.path.join(SOURCE, "sdk", "python")],
                           capture_output=True, text=True, cwd=self.dir)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "import iothub_gw, sys; print(iothub_gw.__version__, iothub_gw.__file__)"],
                           capture_output=True, text=True, cwd="/")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(venv, r.stdout)


del test_sdk_c.SdkC   # run only the Python flavour here

if __name__ == "__main__":
    H.main()
