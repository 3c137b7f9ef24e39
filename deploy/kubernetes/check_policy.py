#!/usr/bin/env python3
"""Checks what deploy/README.md promises about the rendered Kubernetes manifests, which a
schema cannot: the pod's hardening, probes on the admin port, a grace period above the
gateway's shutdown_delay + shutdown_grace (read from the ConfigMap's config.toml), listeners on
0.0.0.0 matching the container ports, TLS files inside the Secret's mount, Services,
PodDisruptionBudget and ServiceMonitor selecting the pods and naming real ports, and no private
key anywhere in the output.

Usage: check_policy.py RENDERED.yaml
"""

import re
import sys
import tomllib

import yaml

errors = []


def check(ok, message):
    if not ok:
        errors.append(message)
    return ok


def seconds(text):
    """A gateway duration ("10s", "500ms", "2m") in seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        raise ValueError(f"duration {text!r}")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def main(path):
    text = open(path).read()
    check("PRIVATE KEY" not in text, "the rendered output holds a private key")
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"):
        check(kind in by_kind, f"no {kind} in the output")
    check("Secret" not in by_kind, "a Secret in the output: the TLS Secret is the operator's")
    [deploy] = by_kind["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    check(selects(deploy["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "pod: runAsNonRoot is not true")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod: seccompProfile")
    [c] = pod["containers"]
    sc = c.get("securityContext", {})
    check(sc.get("allowPrivilegeEscalation") is False, "container: allowPrivilegeEscalation")
    check(sc.get("readOnlyRootFilesystem") is True, "container: readOnlyRootFilesystem")
    check("ALL" in sc.get("capabilities", {}).get("drop", []), "container: capabilities.drop ALL")
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            check(res in c.get("resources", {}).get(part, {}), f"container: resources.{part}.{res}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check("admin" in ports, "container: no port named admin")
    for probe, endpoint in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == endpoint and get.get("port") == "admin",
              f"container: {probe} is not GET {endpoint} on port admin")

    # The configuration file, from the ConfigMap mounted at /etc/oauth-apps-gateway.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = [n for n, p in mounts.items() if p == "/etc/oauth-apps-gateway"]
    check(len(config_volume) == 1, "no volume mounted at /etc/oauth-apps-gateway")
    cm_name = volumes[config_volume[0]]["configMap"]["name"]
    [cm] = [m for m in by_kind["ConfigMap"] if m["metadata"]["name"] == cm_name]
    config = tomllib.loads(cm["data"]["config.toml"])
    server, admin = config.get("server", {}), config.get("admin", {})
    delay = seconds(server.get("shutdown_delay", "0s"))
    grace = seconds(server.get("shutdown_grace", "30s"))
    check(delay > 0, "server.shutdown_delay is not set above 0s")
    check(pod.get("terminationGracePeriodSeconds", 30) > delay + grace,
          f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} is not above "
          f"shutdown_delay + shutdown_grace ({delay:g} s + {grace:g} s)")
    probe = c["readinessProbe"]
    check(delay >= probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3),
          "server.shutdown_delay is shorter than readiness periodSeconds x failureThreshold")
    for key, listener, port in (("server.listen", server, "https"), ("admin.listen", admin, "admin")):
        listen = listener.get("listen", "")
        check(listen == f"0.0.0.0:{ports.get(port)}",
              f"{key} is {listen!r}, not 0.0.0.0:<containerPort {port}>")
    secret_mounts = [mounts[n] for n, v in volumes.items() if "secret" in v and n in mounts]
    for key in ("tls_cert_file", "tls_key_file"):
        file = server.get(key, "")
        check(any(file.startswith(m.rstrip("/") + "/") for m in secret_mounts),
              f"server.{key} {file!r} is not in a mounted Secret")

    # Services, PodDisruptionBudget and ServiceMonitor find the pods and their ports.
    services = by_kind["Service"]
    for svc in services:
        check(selects(svc["spec"]["selector"], pod_labels),
              f"Service {svc['metadata']['name']} does not select the pods")
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {svc['metadata']['name']}: no container port {p['targetPort']}")
    [pdb] = by_kind["PodDisruptionBudget"]
    check(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PodDisruptionBudget selector")
    check(deploy["spec"].get("replicas", 1) > 1, "one replica: the PodDisruptionBudget would block drains")
    [sm] = by_kind["ServiceMonitor"]
    scraped = [s for s in services if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    check(len(scraped) == 1, f"ServiceMonitor selects {len(scraped)} Services, not 1")
    for ep in sm["spec"]["endpoints"]:
        names = [p.get("name") for s in scraped for p in s["spec"]["ports"]]
        check(ep.get("port") in names, f"ServiceMonitor endpoint port {ep.get('port')!r} is not a port of the Service")
        check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor path is not /metrics")
    apps = [s for s in services if s not in scraped]
    for s in apps:
        check(all(p["targetPort"] != "admin" for p in s["spec"]["ports"]),
              f"Service {s['metadata']['name']} routes to the admin port")

    for e in errors:
        print(f"ERROR {path}: {e}")
    if not errors:
        print(f"INFO {path}: hardening, probes, grace period ({pod['terminationGracePeriodSeconds']} s > "
              f"{delay:g} s + {grace:g} s), listeners, TLS mount, selectors and ports as documented")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
