#!/usr/bin/env python3
"""tests/deploy/test_grafana.py - checks conf/grafana/sclb-dashboard.json.

Stdlib only (no pytest, no Grafana, no Prometheus). Checks that the dashboard:
  - is valid JSON (no duplicate keys), schemaVersion 39, importable through the
    Grafana UI (a ${DS_PROMETHEUS} datasource input, no hard-coded datasource uid);
  - has the expected rows, unique panel ids, a datasource and a description on every
    panel, and a grid layout without overlaps;
  - uses only the metric names sclb exports (any unknown sclb_* name fails, as does
    a label the metric does not have) in panel queries, annotations and variables;
  - uses every templating variable.

Usage: tests/deploy/test_grafana.py [DASHBOARD.json]
Last line: "N passed, N failed"; exit status 1 if anything failed.
"""
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "conf", "grafana", "sclb-dashboard.json")

# Every metric sclb exports on :9000/metrics, with its labels (HAProxy exporter names,
# sclb_ prefix). Prometheus adds instance and job when it scrapes.
SERVER = ("proxy", "server")
METRICS = {
    "sclb_server_status": SERVER + ("state",),
    "sclb_server_current_sessions": SERVER,
    "sclb_server_max_sessions": SERVER,
    "sclb_server_sessions_total": SERVER,
    "sclb_server_bytes_in_total": SERVER,
    "sclb_server_bytes_out_total": SERVER,
    "sclb_server_connection_errors_total": SERVER,
    "sclb_server_retry_warnings_total": SERVER,
    "sclb_server_redispatch_warnings_total": SERVER,
    "sclb_server_check_failures_total": SERVER,
    "sclb_server_check_up_down_total": SERVER,
    "sclb_server_current_queue": SERVER,
    "sclb_server_weight": SERVER,
    "sclb_server_check_last_change_seconds": SERVER,
    "sclb_server_spark_info": SERVER + ("version",),
    "sclb_backend_status": ("proxy", "state"),
    "sclb_backend_current_sessions": ("proxy",),
    "sclb_backend_active_servers": ("proxy",),
    "sclb_backend_sessions_total": ("proxy",),
    "sclb_backend_repins_total": ("proxy",),
    "sclb_frontend_current_sessions": ("proxy",),
    "sclb_frontend_sessions_total": ("proxy",),
    "sclb_frontend_bytes_in_total": ("proxy",),
    "sclb_frontend_bytes_out_total": ("proxy",),
    "sclb_frontend_denied_connections_total": ("proxy",),
    "sclb_sticktable_used": ("name",),
    "sclb_sticktable_size": ("name",),
    "sclb_reloads_total": (),
    "sclb_reload_failures_total": (),
    "sclb_process_start_time_seconds": (),
    # The gateway's Spark session metrics.
    "spark_connect_sessions_active": (),
    "spark_connect_sessions_created_total": (),
    "spark_connect_sessions_expired_total": ("reason",),
    "spark_connect_proxy_requests_total": ("method", "code"),
    "spark_connect_proxy_errors_total": ("reason",),
    "spark_connect_session_duration_seconds_bucket": ("le",),
    "spark_connect_message_latency_seconds_bucket": ("method", "le"),
}
SCRAPE_LABELS = ("instance", "job")
STATES = {"sclb_server_status": {"UP", "DOWN", "MAINT", "DRAIN"},
          "sclb_backend_status": {"UP", "DOWN"}}
ROWS = ["Overview", "Sessions per server", "Health", "Traffic", "Queue & errors", "Stick table",
        "Spark sessions (gateway)"]
REQUIRED_VARS = {"proxy", "server"}
DS_UID = "${DS_PROMETHEUS}"

passed = 0
failed = 0


def check(desc, problems):
    """Record one test: pass when `problems` (a list of strings) is empty."""
    global passed, failed
    if problems:
        failed += 1
        print(f"FAIL  {desc}")
        for p in problems[:40]:
            print(f"      | {p}")
        if len(problems) > 40:
            print(f"      | ... and {len(problems) - 40} more")
    else:
        passed += 1
        print(f"ok    {desc}")


def finish():
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


# ---------------------------------------------------------------- PromQL helpers
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
METRIC_NAME = re.compile(r"(?<![\w:$])(?:sclb|haproxy|spark_connect)_[A-Za-z0-9_:]*")
# a metric name followed by a {label selector}
SELECTOR = re.compile(r"(?<![\w:$])((?:sclb|spark_connect)_[A-Za-z0-9_:]*)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*(?:,|$)')


def strip_strings(expr):
    return STRING.sub('""', expr)


def strip_comments(expr):
    return "\n".join(_cut_comment(line) for line in expr.split("\n"))


def _cut_comment(line):
    # drop a '#' comment that is not inside a string literal
    out, i = [], 0
    for m in STRING.finditer(line):
        head = line[i:m.start()]
        if "#" in head:
            out.append(head.split("#")[0])
            return "".join(out)
        out.append(head + m.group(0))
        i = m.end()
    return "".join(out) + line[i:].split("#")[0]


def promql_problems(expr):
    """Problems with one PromQL expression: unknown metric names, unknown labels,
    unknown state values, unbalanced brackets, no sclb metric at all."""
    out = []
    code = strip_comments(expr)
    bare = strip_strings(code)
    names = METRIC_NAME.findall(bare)
    for n in names:
        if n not in METRICS:
            out.append(f"unknown metric {n!r} (sclb does not export it) in: {expr}")
    if not any(n in METRICS for n in names):
        out.append(f"no sclb metric in: {expr}")
    # brackets balance outside string literals
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                out.append(f"unbalanced {ch!r} in: {expr}")
                break
    else:
        if stack:
            out.append(f"unclosed {stack[-1]!r} in: {expr}")
    # label selectors: labels the metric has, state values it can take
    for m in SELECTOR.finditer(code):
        name, body = m.group(1), m.group(2)
        if name not in METRICS:
            continue
        allowed = set(METRICS[name]) | set(SCRAPE_LABELS)
        rest = body.strip()
        while rest:
            mm = MATCHER.match(rest)
            if not mm:
                out.append(f"cannot parse label matchers {{{body}}} of {name}")
                break
            label, op, value = mm.group(1), mm.group(2), json.loads(mm.group(3))
            if label not in allowed:
                out.append(f"{name} has no label {label!r} (it has {sorted(METRICS[name])})")
            if label == "state" and name in STATES and op in ("=", "!="):
                if value not in STATES[name]:
                    out.append(f"{name}: state {value!r} is not one of {sorted(STATES[name])}")
            rest = rest[mm.end():].strip()
    # by/without/on/ignoring(...) may only name labels some metric in the expression has
    used = [n for n in names if n in METRICS]
    known = set(SCRAPE_LABELS).union(*(METRICS[n] for n in used)) if used else set(SCRAPE_LABELS)
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", bare):
        for label in filter(None, (s.strip() for s in m.group(2).split(","))):
            if label not in known:
                out.append(f"{m.group(1)}({label}) names a label none of {used} has: {expr}")
    return out


def var_query(v):
    q = v.get("query", "")
    if isinstance(q, dict):
        q = q.get("query", "")
    return q or v.get("definition", "")


# ---------------------------------------------------------------- load
path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
path = os.path.normpath(path)


def no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"duplicate keys {dups}")
    return dict(pairs)


try:
    with open(path, encoding="utf-8") as f:
        dash = json.load(f, object_pairs_hook=no_duplicate_keys)
    load_problems = [] if isinstance(dash, dict) else ["top level is not a JSON object"]
except (OSError, ValueError) as e:
    dash, load_problems = None, [f"{path}: {e}"]
shown = sys.argv[1] if len(sys.argv) > 1 else os.path.relpath(path)
check(f"{shown} is valid JSON with no duplicate keys", load_problems)
if load_problems:
    finish()

# ---------------------------------------------------------------- dashboard level
p = []
if dash.get("schemaVersion") != 39:
    p.append(f"schemaVersion is {dash.get('schemaVersion')!r}, want 39")
if not dash.get("title"):
    p.append("no title")
uid = dash.get("uid")
if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
    p.append(f"uid {uid!r} must be 1-40 characters of [A-Za-z0-9_-]")
if dash.get("id") is not None:
    p.append(f"id must be null in an exported dashboard, is {dash.get('id')!r}")
check("dashboard: schemaVersion 39, title, stable uid, id null", p)

p = []
inputs = {i.get("name"): i for i in dash.get("__inputs", []) if isinstance(i, dict)}
ds = inputs.get("DS_PROMETHEUS")
if not ds:
    p.append("__inputs has no DS_PROMETHEUS")
elif ds.get("type") != "datasource" or ds.get("pluginId") != "prometheus":
    p.append(f"DS_PROMETHEUS must be a prometheus datasource input, is {ds}")
raw = json.dumps(dash)
for ref in sorted(set(re.findall(r"\$\{(DS_[A-Z0-9_]+)\}", raw))):
    if ref not in inputs:
        p.append(f"${{{ref}}} is used but not declared in __inputs")
req = {(r.get("type"), r.get("id")) for r in dash.get("__requires", [])}
if ("datasource", "prometheus") not in req:
    p.append("__requires does not list the prometheus datasource")
check("import: ${DS_PROMETHEUS} is a declared prometheus datasource input", p)

# ---------------------------------------------------------------- panels
top = dash.get("panels")
if not isinstance(top, list) or not top:
    check("dashboard has panels", ["no panels"])
    finish()
panels = []  # every panel, rows included, with the row it sits in
row_titles = []
current_row = None
for pn in top:
    if pn.get("type") == "row":
        current_row = pn.get("title")
        row_titles.append(current_row)
        panels.append((pn, None))
        for sub in pn.get("panels", []):  # a collapsed row holds its panels
            panels.append((sub, current_row))
    else:
        panels.append((pn, current_row))
leaves = [(pn, r) for pn, r in panels if pn.get("type") != "row"]


def label(pn):
    return f"panel {pn.get('id')!r} {pn.get('title')!r}"


check(f"rows are {ROWS}", [] if row_titles == ROWS else [f"rows are {row_titles}"])

p = []
for pn, r in leaves:
    if r is None:
        p.append(f"{label(pn)} is above the first row")
for name in ROWS:
    if name in row_titles and not any(r == name for _, r in leaves):
        p.append(f"row {name!r} has no panels")
check("every panel sits in a row and no row is empty", p)

p = []
seen = {}
for pn, _ in panels:
    i = pn.get("id")
    if not isinstance(i, int) or isinstance(i, bool):
        p.append(f"{label(pn)}: id is not an integer")
    elif i in seen:
        p.append(f"id {i} used by {seen[i]!r} and {pn.get('title')!r}")
    else:
        seen[i] = pn.get("title")
check(f"all {len(panels)} panels have a unique integer id", p)


def ds_problem(where, d):
    if not isinstance(d, dict):
        return f"{where}: datasource is {d!r}, want {{type: prometheus, uid: {DS_UID}}}"
    if d.get("type") != "prometheus" or d.get("uid") != DS_UID:
        return f"{where}: datasource is {d}, want {{type: prometheus, uid: {DS_UID}}}"
    return None


p = []
for pn, _ in panels:
    e = ds_problem(label(pn), pn.get("datasource"))
    if e:
        p.append(e)
    for t in pn.get("targets", []):
        if "datasource" in t:
            e = ds_problem(f"{label(pn)} target {t.get('refId')}", t.get("datasource"))
            if e:
                p.append(e)
for a in dash.get("annotations", {}).get("list", []):
    if not a.get("builtIn"):
        e = ds_problem(f"annotation {a.get('name')!r}", a.get("datasource"))
        if e:
            p.append(e)
check("every panel, target and query annotation uses the ${DS_PROMETHEUS} datasource", p)

p = []
for pn, _ in leaves:
    d = pn.get("description", "")
    if not pn.get("title"):
        p.append(f"{label(pn)}: no title")
    if not isinstance(d, str) or len(d.split()) < 8:
        p.append(f"{label(pn)}: description missing or too short for an operator ({d!r})")
check("every panel has a title and an operator-facing description", p)

p = []
for pn, _ in leaves:
    ts = pn.get("targets")
    if not isinstance(ts, list) or not ts:
        p.append(f"{label(pn)}: no targets")
        continue
    refs = [t.get("refId") for t in ts]
    if len(set(refs)) != len(refs) or not all(refs):
        p.append(f"{label(pn)}: refIds {refs} are missing or repeated")
    for t in ts:
        if not isinstance(t.get("expr"), str) or not t["expr"].strip():
            p.append(f"{label(pn)} target {t.get('refId')}: no PromQL expr")
check("every panel has queries, each with an expr and a unique refId", p)

p = []
cells = {}
for pn, _ in panels:
    g = pn.get("gridPos") or {}
    try:
        x, y, w, h = (int(g[k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        p.append(f"{label(pn)}: gridPos {g!r} lacks x, y, w or h")
        continue
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
        p.append(f"{label(pn)}: gridPos {g} is outside the 24-column grid")
    if pn.get("type") == "row" and pn.get("collapsed"):
        continue
    for cx in range(x, x + w):
        for cy in range(y, y + h):
            other = cells.setdefault((cx, cy), pn.get("id"))
            if other != pn.get("id"):
                p.append(f"{label(pn)} overlaps panel {other} at ({cx},{cy})")
                break
        else:
            continue
        break
check("grid layout: every panel inside 24 columns, none overlapping", p)

# ---------------------------------------------------------------- PromQL
exprs = []  # (where, expr)
for pn, _ in leaves:
    for t in pn.get("targets", []):
        if isinstance(t.get("expr"), str):
            exprs.append((f"{label(pn)} target {t.get('refId')}", t["expr"]))
for a in dash.get("annotations", {}).get("list", []):
    if a.get("builtIn"):
        continue
    if not a.get("expr"):
        continue
    exprs.append((f"annotation {a.get('name')!r}", a["expr"]))
variables = dash.get("templating", {}).get("list", [])
for v in variables:
    q = var_query(v)
    if v.get("type") != "query":
        continue
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
    if m:
        exprs.append((f"variable ${v.get('name')}", m.group(1)))

p = []
used_metrics = set()
for where, expr in exprs:
    for e in promql_problems(expr):
        p.append(f"{where}: {e}")
    used_metrics.update(n for n in METRIC_NAME.findall(strip_strings(expr)) if n in METRICS)
check(f"all {len(exprs)} PromQL expressions use only sclb's metric names and labels", p)

p = []
for pn, _ in leaves:
    for t in pn.get("targets", []):
        expr = t.get("expr", "")
        for n in METRIC_NAME.findall(strip_strings(expr)):
            if n.endswith("_total") and not re.search(
                    rf"\b(rate|irate|increase|changes|resets)\s*\(\s*{n}\b", strip_strings(expr)):
                p.append(f"{label(pn)}: counter {n} is not wrapped in rate()/increase()")
            if n in METRICS and not n.endswith(("_total", "_bucket")) and re.search(
                    rf"\b(rate|irate|increase)\s*\(\s*{n}\b", strip_strings(expr)):
                p.append(f"{label(pn)}: gauge {n} is wrapped in rate()/increase()")
check("counters are read with rate()/increase(), gauges are not", p)

# coverage of the metrics the runbook asks for (seed: Monitoring & Observability)
KEY = {
    "per-server active sessions": "sclb_server_current_sessions",
    "health-check failure rate": "sclb_server_check_failures_total",
    "connection distribution across servers": "sclb_server_sessions_total",
    "total active sessions": "sclb_backend_current_sessions",
    "lost Spark sessions (re-pins)": "sclb_backend_repins_total",
    "server state": "sclb_server_status",
    "stick table fill": "sclb_sticktable_used",
}
check("the key metrics of the runbook each have a panel",
      [f"no panel shows {k} ({m})" for k, m in KEY.items() if m not in used_metrics])

# ---------------------------------------------------------------- templating
p = []
names = [v.get("name") for v in variables]
for want in sorted(REQUIRED_VARS - set(names)):
    p.append(f"no templating variable {want!r}")
for v in variables:
    n, q = v.get("name"), var_query(v)
    if v.get("type") != "query":
        continue
    if not re.fullmatch(r"\s*label_values\(.*\)\s*", q):
        p.append(f"${n}: query {q!r} is not label_values(...)")
    e = ds_problem(f"${n}", v.get("datasource"))
    if e:
        p.append(e)
    if v.get("multi") and v.get("includeAll") and v.get("allValue") not in (".*", ".+"):
        p.append(f"${n}: multi-value with All needs allValue '.*' for =~ matchers")
check("templating: proxy and server come from label_values over sclb metrics", p)

p = []
for v in variables:
    n = v.get("name")
    use = re.compile(rf"\$\{{{n}(?::[^}}]*)?\}}|\[\[{n}(?::[^\]]*)?\]\]|\${n}(?![A-Za-z0-9_])")
    # everything but the variable itself: panels, annotations, other variables, links
    rest = dict(dash)
    rest["templating"] = {"list": [o for o in variables if o is not v]}
    if not use.search(json.dumps(rest)):
        p.append(f"${n} is defined but no query, title or other variable uses it")
    # a variable that filters must be used inside a =~ matcher (it is multi-valued)
    if v.get("multi") or v.get("includeAll"):
        for where, expr in exprs:
            for m in re.finditer(rf'([A-Za-z_][A-Za-z0-9_]*)\s*(=|!=)\s*"[^"]*\${n}\b', expr):
                p.append(f"{where}: multi-value ${n} needs =~, not {m.group(2)}")
check("every templating variable is used (multi-value ones with =~)", p)

finish()
