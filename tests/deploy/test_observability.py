"""The monitoring shipped in deploy/ against the real hub
(docs/operations.md "Monitoring"): promtool checks the alert rules (syntax and
the unit tests of deploy/prometheus/alerts_test.yml) and the compose file's
Prometheus config; `promtool check metrics` passes on a live hub's /metrics;
every iot_hub_* metric the rules and the Grafana dashboard use is one the live
hub exports; a real Prometheus (Debian's) on a free loopback port scrapes the
hub, loads the rules, and answers a query for one of its metrics. Label
`deploy`."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("HUB_SOURCE_DIR") or os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(SRC, "tests", "integration"))
from harness import Hub, Redis, SCHEMAS_DIR, free_port, hub_args, wait_until, write_file  # noqa: E402

PROM_DIR = os.path.join(SRC, "deploy", "prometheus")
DASHBOARD = os.path.join(SRC, "deploy", "grafana", "dashboards", "iot-hub.json")


def promtool(*args, stdin=None):
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def metric_names(text):
    """iot_hub_* names used in PromQL expressions."""
    return set(re.findall(r"\b(iot_hub_[a-z0-9_]+)", text))


@unittest.skipUnless(shutil.which("promtool") and shutil.which("prometheus"),
                     "promtool/prometheus missing (deploy/install-deps.sh installs prometheus)")
class Observability(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="iot-hub-obs-")
        cls.redis = Redis()
        secret = write_file(os.path.join(cls.tmp, "jwt.secret"), os.urandom(16).hex())
        cls.hub = Hub(hub_args(cls.redis, secret, schemas=SCHEMAS_DIR))
        _, cls.metrics = get("http://127.0.0.1:%d/metrics" % cls.hub.port)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.hub.stop()
        finally:
            cls.hub.cleanup()
            cls.redis.stop()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_rules_check_and_unit_tests(self):
        p = promtool("check", "rules", os.path.join(PROM_DIR, "alerts.yml"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        p = promtool("test", "rules", os.path.join(PROM_DIR, "alerts_test.yml"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        p = promtool("check", "config", os.path.join(PROM_DIR, "prometheus.yml"))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_live_metrics_pass_promtool(self):
        p = promtool("check", "metrics", stdin=self.metrics)
        self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""))

    def test_rules_and_dashboard_use_exported_metrics(self):
        live = set(re.findall(r"^(?:# TYPE )?(iot_hub_[a-z0-9_]+)", self.metrics, re.M))
        with open(os.path.join(PROM_DIR, "alerts.yml")) as f:
            used = metric_names(f.read())
        with open(DASHBOARD) as f:
            dash = json.load(f)
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        self.assertGreater(len(exprs), 10)
        used |= metric_names("\n".join(exprs))
        self.assertEqual(sorted(used - live), [], "metrics used but not exported by the hub")
        for p in dash["panels"]:
            self.assertEqual(p["datasource"]["uid"], "prometheus", p["title"])

    def test_real_prometheus_scrapes_the_hub(self):
        port = free_port()
        data = os.path.join(self.tmp, "prom-data")
        conf = write_file(os.path.join(self.tmp, "prometheus.yml"), "\n".join([
            "global: {scrape_interval: 1s, evaluation_interval: 1s}",
            "rule_files: [%s]" % json.dumps(os.path.join(PROM_DIR, "alerts.yml")),
            "scrape_configs:",
            "  - job_name: iot-hub",
            "    static_configs: [{targets: ['127.0.0.1:%d']}]" % self.hub.port, ""]))
        log = open(os.path.join(self.tmp, "prometheus.log"), "w")
        prom = subprocess.Popen(["prometheus", "--config.file=" + conf, "--storage.tsdb.path=" + data,
                                 "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = "http://127.0.0.1:%d" % port

            def ready():
                self.assertIsNone(prom.poll(), "prometheus exited; see %s" % log.name)
                try:
                    return get(base + "/-/ready")[0] == 200
                except OSError:
                    return False
            wait_until(ready, 20, interval=0.2, what="prometheus /-/ready")

            def value():
                q = urllib.parse.urlencode({"query": 'iot_hub_redis_up{job="iot-hub"}'})
                res = json.loads(get(base + "/api/v1/query?" + q)[1])
                self.assertEqual(res["status"], "success", res)
                r = res["data"]["result"]
                return r[0]["value"][1] if r else None
            wait_until(lambda: value() is not None, 20, interval=0.3,
                       what="iot_hub_redis_up in prometheus")
            self.assertEqual(value(), "1")
            rules = json.loads(get(base + "/api/v1/rules")[1])["data"]["groups"]
            self.assertEqual([g["name"] for g in rules], ["iot-hub"])
            self.assertGreaterEqual(len(rules[0]["rules"]), 10)
        finally:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
            log.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
