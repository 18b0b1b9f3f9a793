"""What deploy/ ships for containers, checked as far as a machine without a
container engine can (docs/operations.md "What was run"): the Kubernetes
manifests parse with the right kinds, probes, ports, drain timing and
security context, and agree with each other, with the Dockerfile and with the
device types; the compose file parses, and every file it mounts or builds
from exists; the Dockerfile is multi-stage on debian:12-slim, non-root, has a
health check on /readyz, and its RUN steps call scripts that exist and that
CI runs too; every IOT_HUB_* variable they set is a configuration key.
Nothing here builds an image or starts a container. Label `deploy`."""

import glob
import os
import re
import unittest

try:
    import yaml
except ImportError:  # python3-yaml: deploy/install-deps.sh
    yaml = None

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.realpath(os.environ.get("HUB_SOURCE_DIR") or os.path.join(HERE, "..", ".."))
DEPLOY = os.path.join(SRC, "deploy")
# The hub's SIGTERM drain: DRAIN_GRACE_US plus the 1 s it waits past it
# (hub/lifecycle.c); docs/protocol.md "Shutdown" says "about 6 s at most".
DRAIN_TAIL_S = 1


def read(*p):
    with open(os.path.join(*p), encoding="utf-8") as f:
        return f.read()


def config_keys():
    return set(re.findall(r'O\("([a-z0-9-]+)", OPT_', read(SRC, "hub/config.c")))


def env_key(var):
    return var[len("IOT_HUB_"):].lower().replace("_", "-")


def drain_s():
    m = re.search(r"#define DRAIN_GRACE_US\s+\((\d+) \* 1000 \* 1000\)", read(SRC, "hub/lifecycle.c"))
    assert m, "DRAIN_GRACE_US not found in hub/lifecycle.c"
    return int(m.group(1)) + DRAIN_TAIL_S


def dockerfile():
    """(instructions [(KEYWORD, args)], joined continuation lines)"""
    text = re.sub(r"\\\n", " ", read(DEPLOY, "docker", "Dockerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            kw, _, rest = line.partition(" ")
            out.append((kw.upper(), rest.strip()))
    return out


def docker_env():
    env = {}
    for kw, rest in dockerfile():
        if kw == "ENV":
            for k, v in re.findall(r"(\S+?)=(\S+)", rest):
                env[k] = v
    return env


@unittest.skipUnless(yaml, "python3-yaml missing (deploy/install-deps.sh installs it)")
class Kubernetes(unittest.TestCase):
    def setUp(self):
        self.docs = {}
        for f in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
            for d in yaml.safe_load_all(read(f)):
                self.assertIn("kind", d, f)
                self.docs.setdefault(d["kind"], []).append(d)

    def one(self, kind):
        self.assertEqual(len(self.docs.get(kind, [])), 1, kind)
        return self.docs[kind][0]

    def test_kinds(self):
        self.assertEqual(sorted(self.docs), ["ConfigMap", "Deployment", "Kustomization",
                                             "PodDisruptionBudget", "Secret", "Service"])
        k = self.one("Kustomization")
        for r in k["resources"]:
            self.assertTrue(os.path.isfile(os.path.join(DEPLOY, "k8s", r)), r)

    def test_deployment_probes_ports_drain(self):
        dep = self.one("Deployment")
        self.assertEqual(dep["apiVersion"], "apps/v1")
        pod = dep["spec"]["template"]["spec"]
        self.assertEqual(dep["spec"]["selector"]["matchLabels"],
                         {k: v for k, v in dep["spec"]["template"]["metadata"]["labels"].items()
                          if k in dep["spec"]["selector"]["matchLabels"]})
        self.assertGreaterEqual(dep["spec"]["replicas"], 2)
        (c,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        listen_port = int(env.get("IOT_HUB_LISTEN", docker_env()["IOT_HUB_LISTEN"]).rsplit(":", 1)[1])
        self.assertEqual(ports, {"http": listen_port})
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            g = c[probe]["httpGet"]
            self.assertEqual(g["path"], path, probe)
            self.assertIn(g["port"], ("http", listen_port), probe)
        # preStop, then SIGTERM and the hub's drain, within the grace period
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(cmd[0], "sleep")
        pre = int(cmd[1])
        self.assertGreater(pre, 0)
        grace = pod["terminationGracePeriodSeconds"]
        self.assertGreaterEqual(grace, pre + drain_s() + 2,
                                "terminationGracePeriodSeconds must cover preStop + the drain")
        self.assertLessEqual(grace, pre + drain_s() + 30, "grace period far longer than needed")
        self.assertIs(pod["enableServiceLinks"], False)
        # non-root, as the image's USER
        uid = next(r for k, r in dockerfile() if k == "USER").split(":")[0]
        self.assertEqual(str(pod["securityContext"]["runAsUser"]), uid)
        self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
        self.assertIs(c["securityContext"]["allowPrivilegeEscalation"], False)
        self.assertEqual(c["securityContext"]["capabilities"]["drop"], ["ALL"])
        # IOT_HUB_* are keys
        keys = config_keys()
        for name in env:
            if name.startswith("IOT_HUB_"):
                self.assertIn(env_key(name), keys, name)

    def test_volumes_match_configmap_and_secret(self):
        dep = self.one("Deployment")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        cm, sec = self.one("ConfigMap"), self.one("Secret")
        # device types: the ConfigMap holds deploy/device-types' files, mounted at IOT_HUB_SCHEMAS
        v = next(n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
        self.assertEqual(mounts[v], env["IOT_HUB_SCHEMAS"])
        files = {os.path.basename(f): read(f) for f in glob.glob(os.path.join(DEPLOY, "device-types", "*.json"))}
        self.assertEqual(cm["data"], files, "ConfigMap differs from deploy/device-types")
        # secrets: jwt.secret and api-keys.json where IOT_HUB_JWT_KEY / _API_KEYS point
        v = next(n for n, v in vols.items() if v.get("secret", {}).get("secretName") == sec["metadata"]["name"])
        data = sec.get("stringData") or sec.get("data")
        for var in ("IOT_HUB_JWT_KEY", "IOT_HUB_API_KEYS"):
            d, f = os.path.split(env[var])
            self.assertEqual(d, mounts[v], var)
            self.assertIn(f, data, var)
        self.assertEqual(data["jwt.secret"], "", "the shipped Secret must not hold a usable key")

    def test_service_and_pdb_select_the_pods(self):
        labels = self.one("Deployment")["spec"]["template"]["metadata"]["labels"]
        svc, pdb = self.one("Service"), self.one("PodDisruptionBudget")
        self.assertEqual(pdb["apiVersion"], "policy/v1")
        for sel in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
            self.assertTrue(sel and all(labels.get(k) == v for k, v in sel.items()), sel)
        self.assertEqual([p["targetPort"] for p in svc["spec"]["ports"]], ["http"])
        self.assertTrue("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"])


@unittest.skipUnless(yaml, "python3-yaml missing")
class Compose(unittest.TestCase):
    def setUp(self):
        self.c = yaml.safe_load(read(DEPLOY, "compose.yaml"))

    def test_services(self):
        s = self.c["services"]
        for name in ("redis", "hub1", "hub2", "prometheus", "grafana"):
            self.assertIn(name, s)
        cmd = " ".join(s["redis"]["command"])
        self.assertIn("--appendonly yes", cmd)
        keys = config_keys()
        for hub in ("hub1", "hub2"):
            for var in s[hub]["environment"]:
                self.assertIn(env_key(var), keys, var)
        # Prometheus scrapes both hubs on the port they listen on
        prom = yaml.safe_load(read(DEPLOY, "prometheus", "prometheus.yml"))
        port = docker_env()["IOT_HUB_LISTEN"].rsplit(":", 1)[1]
        targets = [t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]]
        self.assertEqual(sorted(targets), ["hub1:" + port, "hub2:" + port])

    def test_referenced_files_exist(self):
        for name, svc in self.c["services"].items():
            b = svc.get("build")
            if b:
                ctx = os.path.normpath(os.path.join(DEPLOY, b["context"]))
                self.assertTrue(os.path.isfile(os.path.join(ctx, b["dockerfile"])), name)
            for v in svc.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith((".", "/")):
                    self.assertTrue(os.path.exists(os.path.join(DEPLOY, src)), "%s: %s" % (name, src))
                else:
                    self.assertIn(src, self.c["volumes"], name)
        prov = os.path.join(DEPLOY, "grafana", "provisioning")
        self.assertTrue(glob.glob(os.path.join(prov, "datasources", "*.yaml")))
        self.assertTrue(glob.glob(os.path.join(prov, "dashboards", "*.yaml")))
        self.assertTrue(glob.glob(os.path.join(DEPLOY, "grafana", "dashboards", "*.json")))


class Dockerfile(unittest.TestCase):
    def test_stages_user_healthcheck(self):
        ins = dockerfile()
        froms = [r for k, r in ins if k == "FROM"]
        self.assertGreaterEqual(len(froms), 2, "multi-stage")
        for f in froms:
            self.assertTrue(f.startswith("debian:12-slim"), f)
        user = [r for k, r in ins if k == "USER"]
        self.assertEqual(len(user), 1)
        self.assertNotIn(user[0].split(":")[0], ("0", "root"))
        self.assertRegex(user[0], r"^\d+(:\d+)?$", "numeric, for runAsNonRoot")
        hc = [r for k, r in ins if k == "HEALTHCHECK"]
        self.assertTrue(hc and "/readyz" in hc[0])
        entry = [r for k, r in ins if k == "ENTRYPOINT"][0]
        self.assertIn("/usr/bin/iot-hub", entry)
        self.assertIn("/etc/iot-hub/iot-hub.conf", entry)
        for k in docker_env():
            if k.startswith("IOT_HUB_"):
                self.assertIn(env_key(k), config_keys(), k)

    def test_run_steps_are_the_ci_scripts(self):
        runs = " ".join(r for k, r in dockerfile() if k == "RUN")
        scripts = re.findall(r"(?:\./)?((?:deploy|tools)/[\w./-]+)", runs)
        self.assertIn("deploy/install-deps.sh", scripts)
        self.assertIn("tools/make-deb", scripts)
        for s in scripts:
            p = os.path.join(SRC, s)
            self.assertTrue(os.path.isfile(p) and os.access(p, os.X_OK), s)
        # CI (.ci/run -> tests/run.sh) installs with the same script, and the
        # package test builds with the same tools/make-deb
        self.assertIn("./deploy/install-deps.sh", read(SRC, "tests", "run.sh"))
        self.assertIn("tests/run.sh", read(SRC, ".ci", "run"))
        self.assertIn("make-deb", read(SRC, "tests", "package", "test_deb.py"))
        # the context keeps build trees out
        self.assertIn("build*/", read(SRC, ".dockerignore"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
