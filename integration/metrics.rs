//! The Prometheus endpoint of a running daemon after a scripted set of reports: values,
//! exposition validity (`promtool check metrics`), alert rules (`promtool check rules`),
//! and that every metric the dashboard and the alerts use is one the daemon exports.

mod common;

use common::Daemon;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The value of one sample line `name{labels} value` whose labels include all of `want`.
fn value(expo: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    expo.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        want.iter()
            .all(|(k, val)| labels.contains(&format!("{k}=\"{val}\"")))
            .then(|| v.parse().ok())
            .flatten()
    })
}

fn promtool() -> &'static str {
    let p = "/usr/bin/promtool";
    assert!(
        std::path::Path::new(p).exists(),
        "promtool is missing: run integration/install-deps.sh (Debian package prometheus)"
    );
    p
}

#[test]
fn scripted_reports_show_up_with_bounded_labels_and_valid_exposition() {
    let d = Daemon::start(
        "[providers.gmail]\ndomains = [\"gmail.test\"]\n[providers.yahoo]\ndomains = [\"yahoo.test\"]\nsuspend_after = 2\n[shaping]\nhousekeeping_interval = \"100ms\"\n",
    );
    let report = |rcpt: &str, reply: &str| {
        d.policy(&[
            ("request", "delivery_report"),
            ("recipient", rcpt),
            ("reply", reply),
        ])
    };
    for i in 0..5 {
        let a = report(
            &format!("u{i}@gmail.test"),
            "250 2.0.0 OK 1732468912 a1si1plg.99 - gsmtp",
        );
        assert!(a.contains("action=DUNNO"), "{a}");
    }
    // A throttling episode of three replies: the first two are forgiven, the third slows down.
    for i in 0..3 {
        let a = report(
            &format!("u9{i}@gmail.test"),
            "421 4.7.28 Gmail has detected an unusual rate of unsolicited email originating from your IP address.",
        );
        assert!(
            a.contains("class=rate_limited") && a.contains("action=DEFER"),
            "{a}"
        );
    }
    for i in 0..3 {
        report(&format!("y{i}@yahoo.test"), "421 4.7.0 [TS03] All messages from 203.0.113.7 will be permanently deferred; Retrying will NOT succeed.");
    }
    let a = report(
        "gone@random-domain-17.example",
        "550 5.1.1 <gone@random-domain-17.example>: Recipient address rejected: User unknown in virtual mailbox table",
    );
    assert!(
        a.contains("class=recipient_unknown") && a.contains("action=REJECT"),
        "{a}"
    );
    let p = d.policy(&[
        ("request", "smtpd_access_policy"),
        ("recipient", "gone@random-domain-17.example"),
    ]);
    assert!(p.starts_with("action=REJECT 5.1.1"), "{p}");
    // A bad request, for the error counter.
    let mut s = TcpStream::connect(&d.addr).unwrap();
    s.write_all(b"request=smtpd_access_policy\nno equals sign here\n\n")
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("action=DUNNO"));

    std::thread::sleep(Duration::from_millis(400)); // one housekeeping export of the gauges
    let expo = d.scrape();
    let v = |name: &str, labels: &[(&str, &str)]| {
        value(&expo, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{expo}"))
    };
    assert_eq!(
        v(
            "mxpace_replies_total",
            &[("site", "gmail"), ("class", "delivered")]
        ),
        5.0
    );
    assert_eq!(
        v(
            "mxpace_replies_total",
            &[("site", "gmail"), ("class", "rate_limited")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "mxpace_replies_total",
            &[("site", "yahoo"), ("class", "reputation_block")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "mxpace_outcomes_total",
            &[("site", "gmail"), ("outcome", "deferred")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "mxpace_outcomes_total",
            &[("site", "other"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(v("mxpace_suppressions_added_total", &[]), 1.0);
    assert_eq!(v("mxpace_suppressions", &[]), 1.0);
    assert_eq!(v("mxpace_destination_suspended", &[("site", "yahoo")]), 1.0);
    assert_eq!(v("mxpace_destination_stage", &[("site", "yahoo")]), 3.0);
    assert!(
        v("mxpace_destination_rate", &[("site", "gmail")]) < 20.0,
        "gmail slowed down after the 421"
    );
    assert_eq!(
        v(
            "mxpace_decisions_total",
            &[("kind", "smtpd_access_policy"), ("action", "suppressed")]
        ),
        1.0
    );
    assert!(v("mxpace_protocol_errors_total", &[("protocol", "policy")]) >= 1.0);
    assert!(
        v(
            "mxpace_request_duration_seconds_count",
            &[("protocol", "policy")]
        ) >= 10.0
    );
    assert!(v("mxpace_suspensions_total", &[("site", "yahoo")]) >= 1.0);
    // Bounded labels: no recipient address or unlisted domain ever becomes a label value.
    assert!(
        !expo.contains("random-domain-17"),
        "unbounded label value leaked"
    );
    assert!(!expo.contains('@'), "an address leaked into a label");

    // The exposition is valid for Prometheus.
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(expo.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 3 for lint findings (style), 1 for errors; errors must not occur.
    assert!(
        out.status.code() == Some(0),
        "promtool check metrics:\n{text}"
    );

    // Every metric named by the dashboard and the alerts exists in the exposition.
    let names: std::collections::BTreeSet<&str> = expo
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    for file in [
        "integration/grafana/mxpace.json",
        "integration/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap();
        let mut i = 0;
        while let Some(k) = text[i..].find("mxpace_") {
            let start = i + k;
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map(|e| start + e)
                .unwrap_or(text.len());
            let name = &text[start..end];
            i = end;
            if name == "mxpace_" {
                continue;
            }
            let exported = names.contains(name)
                || names.iter().any(|n| {
                    n.strip_suffix("_bucket") == Some(name) || n.starts_with(&format!("{name}_"))
                });
            assert!(
                exported,
                "{file} uses {name}, which the daemon does not export"
            );
        }
    }
}

#[test]
fn alert_rules_and_dashboard_are_valid() {
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(format!("{ROOT}/integration/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/integration/grafana/mxpace.json")).unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Delivered per site",
        "Deferred per site",
        "Rejected per site",
        "Stage",
        "Suppression list size",
        "Suspended destinations",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(want)),
            "dashboard lacks a {want:?} panel: {titles:?}"
        );
    }
}
