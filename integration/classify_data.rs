//! The classifier against the shared data: every seed reply must pass, and the public
//! bounce corpus must agree with Sisimai's labels on at least 90% of the scored rows.

use mxpace::classify::{Classifier, Hints};
use std::collections::{BTreeMap, HashMap};

const SEED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/seed-replies.tsv"
));
const CORPUS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/corpus/dev.tsv"
));
const CORPUS_README: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/corpus/README.md"
));

#[test]
fn every_seed_reply_passes() {
    let c = Classifier::builtin();
    let mut failures = Vec::new();
    let mut n = 0;
    for line in SEED
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        assert!(f.len() >= 5, "malformed seed row: {line}");
        let (reply, class, provider, blamed, permanent) = (f[0], f[1], f[2], f[3], f[4]);
        n += 1;
        let v = c.classify(reply, Hints::default());
        let got = (
            v.class.as_str(),
            c.provider_name(v.provider),
            v.blamed.as_str(),
            v.permanent.to_string(),
        );
        if got != (class, provider, blamed, permanent.to_string()) {
            failures.push(format!(
                "{reply}\n    want {class} [{provider}] {blamed} {permanent}\n    got  {} [{}] {} {} (rule {})",
                got.0, got.1, got.2, got.3, c.rule_id_str(v.rule)
            ));
        }
    }
    println!("seed: {}/{n} pass", n - failures.len());
    assert!(n >= 60, "seed file shrank: {n} rows");
    assert!(
        failures.is_empty(),
        "{} seed failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The README's "Sisimai reason → mxpace class" table.
fn reason_map() -> HashMap<String, Vec<String>> {
    let mut map = HashMap::new();
    let table = CORPUS_README
        .split("## Sisimai reason")
        .nth(1)
        .expect("mapping section in corpus README");
    for line in table.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 2 || cells[0].starts_with("Sisimai") || cells[0].starts_with("---") {
            continue;
        }
        let classes: Vec<String> = cells[1].split(',').map(|s| s.trim().to_string()).collect();
        for reason in cells[0].split(',') {
            map.insert(reason.trim().to_string(), classes.clone());
        }
    }
    assert!(map.len() >= 30, "mapping table not found: {map:?}");
    map
}

#[test]
fn corpus_agrees_with_sisimai() {
    let c = Classifier::builtin();
    let map = reason_map();
    let mut lines = CORPUS.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (diag, reason, reason5) = (col("diagnostic"), col("reason"), col("reason_v5_1"));

    // Per Sisimai reason (the first label that is scored): rows, agreeing rows.
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let (mut scored, mut agreed) = (0, 0);
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let labels: Vec<&str> = [f[reason], f[reason5]]
            .into_iter()
            .filter(|r| map.contains_key(*r))
            .collect();
        if labels.is_empty() {
            continue;
        }
        let v = c.classify(f[diag], Hints::default());
        let ok = labels
            .iter()
            .any(|r| map[*r].iter().any(|cl| cl == v.class.as_str()));
        scored += 1;
        let e = per.entry(labels[0].to_string()).or_default();
        e.0 += 1;
        if ok {
            agreed += 1;
            e.1 += 1;
        } else {
            disagreements.push(format!(
                "  {:<16} {:<16} {:<18} {:<32} {}",
                f[reason],
                f[reason5],
                v.class.as_str(),
                c.rule_id_str(v.rule),
                f[diag].chars().take(160).collect::<String>()
            ));
        }
    }
    println!(
        "{:<18} {:>5} {:>6} {:>7}",
        "sisimai reason", "rows", "agree", "%"
    );
    for (r, (n, a)) in &per {
        println!(
            "{r:<18} {n:>5} {a:>6} {:>6.1}%",
            100.0 * *a as f64 / *n as f64
        );
    }
    let pct = 100.0 * agreed as f64 / scored as f64;
    println!("{:<18} {scored:>5} {agreed:>6} {pct:>6.1}%", "overall");
    println!("disagreements (reason, reason_v5_1, mxpace class, rule, text):");
    for d in &disagreements {
        println!("{d}");
    }
    assert!(scored >= 300, "corpus shrank: {scored} scored rows");
    assert!(pct >= 90.0, "agreement {pct:.1}% < 90%");
}

/// Every data row's full verdict, pinned: a change to the matcher (prefilter, regex engine,
/// parser) must not move any row to another class, provider, blamed identity, permanence,
/// code or deciding rule. Each row is classified as given, as a Postfix status-filter key,
/// upper-cased, and with a Gmail MX hint (so provider-scoped rules are exercised for all).
/// After an intended rule change, regenerate the file with `MXPACE_BLESS_VERDICTS=1`.
#[test]
fn verdicts_are_pinned() {
    const PINNED: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/integration/classify_verdicts.tsv"
    );
    let c = Classifier::builtin();
    let mut rows: Vec<(String, &str)> = Vec::new();
    for (i, line) in SEED.lines().enumerate() {
        if !line.starts_with('#') && !line.trim().is_empty() {
            rows.push((format!("seed:{}", i + 1), line.split('\t').next().unwrap()));
        }
    }
    for (i, line) in CORPUS.lines().enumerate().skip(1) {
        rows.push((format!("dev:{}", i + 1), line.split('\t').next().unwrap()));
    }
    let gmail = Hints {
        mx_host: Some("gmail-smtp-in.l.google.com"),
        status: Some("4.7.0"),
    };
    let mut got = String::new();
    for (at, reply) in &rows {
        let key = format!(
            "4.0.0 host mx.example.net[192.0.2.1] said: {reply} (in reply to RCPT TO command)"
        );
        let upper = reply.to_ascii_uppercase();
        for (variant, text, hints) in [
            ("plain", *reply, Hints::default()),
            ("key", key.as_str(), Hints::default()),
            ("upper", upper.as_str(), Hints::default()),
            ("gmail", *reply, gmail),
        ] {
            let v = c.classify(text, hints);
            let head: String = reply.chars().take(48).collect();
            got.push_str(&format!(
                "{at}\t{variant}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{head}\n",
                v.class.as_str(),
                c.provider_name(v.provider),
                v.blamed.as_str(),
                v.permanent,
                v.code.map_or("-".to_string(), |c| c.to_string()),
                v.enhanced.map_or("-".to_string(), |e| e.to_string()),
                c.rule_id_str(v.rule),
            ));
        }
    }
    assert!(rows.len() >= 390, "data shrank: {} rows", rows.len());
    if std::env::var_os("MXPACE_BLESS_VERDICTS").is_some() {
        std::fs::write(PINNED, &got).expect("write pinned verdicts");
    }
    let want = std::fs::read_to_string(PINNED).expect("pinned verdicts file");
    let diff: Vec<String> = want
        .lines()
        .zip(got.lines())
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("  want {w}\n  got  {g}"))
        .collect();
    assert_eq!(
        want.lines().count(),
        got.lines().count(),
        "row count changed"
    );
    assert!(
        diff.is_empty(),
        "{} verdicts moved:\n{}",
        diff.len(),
        diff.join("\n")
    );
}
