#!/usr/bin/env python3
"""Lists the metric names the Grafana dashboard and the Prometheus alert rules query, after
checking that the dashboard is importable JSON (every panel's and query's data source is the
${datasource} template variable). With --scrape FILE (the text of a gateway's /metrics), fails
when a name is neither in the scrape nor one Prometheus makes itself (`up`). With
--write-rules FILE, writes the dashboard's queries as recording rules (Grafana's variables
replaced: $job and $instance by .*, $__rate_interval by 1m, $__range by 1h; a variable's
label_values(selector, label) by its selector), so that
`promtool check rules FILE` parses every one of them.

Usage: metric_names.py [--scrape FILE] [--write-rules FILE]   (reads the files next to it)
"""

import argparse
import json
import pathlib
import re
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "oauth-apps-gateway.json"
RULES = HERE / "prometheus" / "alerts.yml"
# Series Prometheus adds to every scrape; not in the gateway's /metrics text.
SCRAPE_SERIES = {"up"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def names_in(expr):
    """Metric names in a PromQL expression: every name in front of a selector's braces, and
    the first argument of Grafana's label_values()."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and printf strings
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    names |= set(re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    names |= set(re.findall(r"\b(oauth_apps_gateway_[a-z0-9_]+)", expr))
    return names


def dashboard_exprs(errors):
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        errors.append(f"{DASHBOARD}: not JSON: {e}")
        return []
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dash:
            errors.append(f"{DASHBOARD}: no {key!r}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{DASHBOARD}: no 'datasource' template variable of type datasource, query prometheus")
    exprs = []
    for var in variables.values():
        if var.get("type") == "query":
            exprs.append(var["definition"])
            if var.get("datasource") != DATASOURCE:
                errors.append(f"{DASHBOARD}: variable {var['name']}: datasource is not ${{datasource}}")
    ids = set()
    for panel in dash.get("panels", []):
        if panel.get("id") in ids:
            errors.append(f"{DASHBOARD}: panel id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        where = f"{DASHBOARD}: panel {panel.get('title')!r}"
        if panel.get("datasource") != DATASOURCE:
            errors.append(f"{where}: datasource is not ${{datasource}}")
        if not panel.get("targets"):
            errors.append(f"{where}: no query")
        for target in panel.get("targets", []):
            if target.get("datasource") != DATASOURCE:
                errors.append(f"{where}: query {target.get('refId')}: datasource is not ${{datasource}}")
            exprs.append(target["expr"])
    return exprs


def rule_exprs():
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def scrape_names(path):
    names = set()
    for line in pathlib.Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scrape", help="a gateway's /metrics text to check the names against")
    parser.add_argument("--write-rules", help="write the dashboard's queries as a rules file here")
    args = parser.parse_args()
    errors = []
    used = {}
    dashboard = dashboard_exprs(errors)
    if args.write_rules:
        grafana = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
        rules = []
        for i, expr in enumerate(dashboard):
            for var, value in grafana.items():
                expr = expr.replace(var, value)
            # A variable's label_values(selector, label) queries the selector's series.
            expr = re.sub(r"^label_values\((.*),\s*[a-zA-Z_]+\)$", r"\1", expr)
            if "$" in expr:
                errors.append(f"{DASHBOARD}: query with an unknown variable: {expr}")
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        text = yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False)
        pathlib.Path(args.write_rules).write_text(text)
    for source, exprs in (("dashboard", dashboard), ("alerts", rule_exprs())):
        for expr in exprs:
            for name in names_in(expr):
                used.setdefault(name, set()).add(source)
    known = scrape_names(args.scrape) | SCRAPE_SERIES if args.scrape else None
    for name in sorted(used):
        mark = ""
        if known is not None and name not in known:
            mark = "  NOT IN SCRAPE"
            errors.append(f"{name} ({', '.join(sorted(used[name]))}) is not in {args.scrape}")
        print(f"{name}  [{', '.join(sorted(used[name]))}]{mark}")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
