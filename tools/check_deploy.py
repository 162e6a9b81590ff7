#!/usr/bin/env python3
"""Checks deploy/kubernetes without a cluster.

1. Every manifest validates against the Kubernetes schemas (kubernetes-validate,
   strict: unknown fields are errors), and the kustomization lists every file.
2. Every kvrouter container's arguments and environment are ones kvrouter
   accepts: the binary runs them with --check-config (ConfigMaps mounted into
   the container are written to a temporary directory at the same relative
   paths; values a pod gets from its own status stand in as an example IP).
"""
import os
import subprocess
import sys
import tempfile

import yaml

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "deploy", "kubernetes")


def main() -> int:
    kvrouter, validate = sys.argv[1], sys.argv[2]
    files = sorted(f for f in os.listdir(DEPLOY) if f.endswith(".yaml"))
    kust = yaml.safe_load(open(os.path.join(DEPLOY, "kustomization.yaml")))
    listed = set(kust["resources"])
    missing = [f for f in files if f != "kustomization.yaml" and f not in listed]
    if missing:
        print(f"not in kustomization.yaml: {missing}")
        return 1
    manifests = [os.path.join(DEPLOY, f) for f in files if f != "kustomization.yaml"]
    r = subprocess.run([validate, "--strict", "--quiet", *manifests])
    if r.returncode != 0:
        return 1
    docs = [d for f in manifests for d in yaml.safe_load_all(open(f)) if d]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if not c["image"].startswith("kvrouter:"):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                args = list(c.get("args", []))
                for m in c.get("volumeMounts", []):
                    cm = volumes.get(m["name"], {}).get("configMap")
                    if not cm:
                        continue
                    local = os.path.join(tmp, m["name"])
                    os.makedirs(local)
                    for name, text in configmaps[cm["name"]].items():
                        open(os.path.join(local, name), "w").write(text)
                    args = [a.replace(m["mountPath"], local) for a in args]
                env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
                for e in c.get("env", []):
                    env[e["name"]] = e["value"] if "value" in e else "10.0.0.1"
                r = subprocess.run(
                    [kvrouter, *args, "--check-config"], env=env, capture_output=True, text=True
                )
                where = f'{d["metadata"]["name"]}/{c["name"]}'
                if r.returncode != 0:
                    print(f"{where}: kvrouter refuses its arguments:\n{r.stderr}")
                    return 1
                print(f"{where}: {' '.join(args[:1])} arguments and environment accepted")
                checked += 1
    print(f"{len(manifests)} manifests valid; {checked} kvrouter containers' flags accepted")
    return 0 if checked > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
