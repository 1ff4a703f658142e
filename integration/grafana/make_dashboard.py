#!/usr/bin/env python3
"""Generates mxpace.json, the Grafana dashboard (run after editing; the JSON is committed)."""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
pid = 0


def panel(title, exprs, x, y, w=8, h=8, kind="timeseries", unit=None, legend="{{site}}", stack=False, extra=None):
    global pid
    pid += 1
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": lf}
            for i, (e, lf) in enumerate(exprs if isinstance(exprs[0], tuple) else [(e, legend) for e in exprs])
        ],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
    }
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
    if extra:
        p.update(extra)
    panels.append(p)


def row(title, y):
    global pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})


y = 0
row("Per provider, side by side (the average hides the one provider that is rejecting)", y)
y += 1
for i, outcome in enumerate(["delivered", "deferred", "rejected"]):
    panel(
        f"{outcome.capitalize()} per site (msg/s)",
        [f'sum by (site) (rate(mxpace_outcomes_total{{outcome="{outcome}"}}[$__rate_interval]))'],
        8 * i, y, unit="reqps",
    )
y += 8
panel(
    "Deferral share per site",
    [('sum by (site) (rate(mxpace_outcomes_total{outcome="deferred"}[$__rate_interval])) / sum by (site) (rate(mxpace_outcomes_total[$__rate_interval]))', "{{site}}"),
     ('sum (rate(mxpace_outcomes_total{outcome="deferred"}[$__rate_interval])) / sum (rate(mxpace_outcomes_total[$__rate_interval]))', "all sites")],
    0, y, w=12, unit="percentunit",
)
panel(
    "Rejection share per site",
    [('sum by (site) (rate(mxpace_outcomes_total{outcome="rejected"}[$__rate_interval])) / sum by (site) (rate(mxpace_outcomes_total[$__rate_interval]))', "{{site}}"),
     ('sum (rate(mxpace_outcomes_total{outcome="rejected"}[$__rate_interval])) / sum (rate(mxpace_outcomes_total[$__rate_interval]))', "all sites")],
    12, y, w=12, unit="percentunit",
)
y += 8
panel(
    "Replies by class",
    [("sum by (class) (rate(mxpace_replies_total[$__rate_interval]))", "{{class}}")],
    0, y, w=24, unit="reqps", stack=True,
)
y += 8
row("Destinations (site × sending identity)", y)
y += 1
panel(
    "Stage (0 trusted, 1 hesitating, 2 throttled, 3 rejecting)",
    [("max by (site, identity) (mxpace_destination_stage)", "{{site}} × {{identity}}")],
    0, y, w=12, kind="state-timeline",
    extra={"fieldConfig": {"defaults": {"mappings": [{"type": "value", "options": {
        "0": {"text": "trusted", "color": "green"}, "1": {"text": "hesitating", "color": "yellow"},
        "2": {"text": "throttled", "color": "orange"}, "3": {"text": "rejecting", "color": "red"}}}],
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []}},
)
panel("Admitted rate (msg/s)", [("mxpace_destination_rate", "{{site}} × {{identity}}")], 12, y, w=6, unit="reqps")
panel("Concurrency limit", [("mxpace_destination_concurrency", "{{site}} × {{identity}}")], 18, y, w=6)
y += 8
panel("Suspended destinations", [("mxpace_destination_suspended", "{{site}} × {{identity}}")], 0, y, w=8, kind="state-timeline")
panel("Suspensions (per hour)", [("sum by (site) (increase(mxpace_suspensions_total[1h]))", "{{site}}")], 8, y, w=8)
panel("Unlisted sites by stage", [("mxpace_other_destinations", "{{stage}}")], 16, y, w=8, stack=True)
y += 8
row("Suppressions", y)
y += 1
panel("Suppression list size", [("mxpace_suppressions", "suppressed recipients")], 0, y, w=12)
panel("Suppressions added (per hour)", [("increase(mxpace_suppressions_added_total[1h])", "added")], 12, y, w=12)
y += 8
row("The daemon", y)
y += 1
panel("Request latency p99 by protocol",
      [("histogram_quantile(0.99, sum by (le, protocol) (rate(mxpace_request_duration_seconds_bucket[$__rate_interval])))", "{{protocol}}")],
      0, y, w=8, unit="s")
panel("Decisions by action", [("sum by (kind, action) (rate(mxpace_decisions_total[$__rate_interval]))", "{{kind}} {{action}}")], 8, y, w=8, unit="reqps")
panel("Open connections / protocol errors",
      [("sum by (protocol) (mxpace_open_connections)", "open {{protocol}}"),
       ("sum by (protocol, kind) (rate(mxpace_protocol_errors_total[$__rate_interval]))", "errors {{protocol}} {{kind}}")],
      16, y, w=8)
y += 8
panel("Tracked destinations / evictions",
      [("mxpace_destinations_tracked", "tracked"), ("rate(mxpace_destination_evictions_total[$__rate_interval])", "evicted/s")],
      0, y, w=12)
panel("Config reloads", [("sum by (result) (increase(mxpace_config_reloads_total[1h]))", "{{result}}")], 12, y, w=12)

dashboard = {
    "title": "mxpace",
    "uid": "mxpace",
    "tags": ["mail", "mxpace"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
    "panels": panels,
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mxpace.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(out)
