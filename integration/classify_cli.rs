//! `mxpace classify` end to end: arguments, standard input, JSON, explain, bad rule files.

use std::io::Write;
use std::process::{Command, Stdio};

fn mxpace() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mxpace"))
}

#[test]
fn plain_json_and_explain() {
    let out = mxpace()
        .args(["classify", "421 4.7.0 [TSS04] Messages from 203.0.113.7 temporarily deferred due to user complaints"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "rate_limited yahoo ip yahoo.temporarily_deferred\n"
    );

    let out = mxpace()
        .args([
            "classify",
            "--json",
            "4.7.28 host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your DKIM domain [x.example] (in reply to end of DATA command)",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["class"], "rate_limited");
    assert_eq!(v["provider"], "gmail");
    assert_eq!(v["blamed"], "dkim_domain");
    assert_eq!(v["permanent"], false);
    assert_eq!(v["code"], 421);
    assert_eq!(v["enhanced"], "4.7.28");
    assert_eq!(v["rule"], "gmail.unusual_rate.dkim_domain");
    assert_eq!(v["mx_host"], "gmail-smtp-in.l.google.com");
    assert_eq!(v["mx_ip"], "142.250.1.27");
    assert_eq!(v["stage"], "end_of_data");

    let out = mxpace()
        .args([
            "classify",
            "--explain",
            "550 5.1.1 The email account that you tried to reach does not exist.",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for part in [
        "class:       recipient_unknown",
        "rule:        gmail.account.not_exist",
        "next step:   Suppress",
    ] {
        assert!(text.contains(part), "{text}");
    }
}

#[test]
fn one_reply_per_stdin_line() {
    let mut child = mxpace()
        .args(["classify", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"550 5.1.1 User unknown\n452 4.2.2 Mailbox full\nconnect to mx.example.net[192.0.2.1]:25: Connection refused\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let classes: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["class"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        classes,
        ["recipient_unknown", "mailbox_full", "network_error"]
    );
}

#[test]
fn rules_files_extend_and_bad_ones_exit_64() {
    let dir = std::env::temp_dir().join(format!("mxpace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("local.toml");
    std::fs::write(
        &good,
        "[[rule]]\nid = \"local.frob\"\npriority = 1\ntext = \"frobnicated\"\nclass = \"policy_rejected\"\ndescription = \"Local.\"\n",
    )
    .unwrap();
    let out = mxpace()
        .args([
            "classify",
            "--rules",
            good.to_str().unwrap(),
            "550 frobnicated",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "policy_rejected - none local.frob\n"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "\n[[rule]]\nid = \"local.bad\"\npriority = 1\ntext = \"(unclosed\"\nclass = \"policy_rejected\"\ndescription = \"x\"\n",
    )
    .unwrap();
    let out = mxpace()
        .args(["classify", "--rules", bad.to_str().unwrap(), "550 x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    for part in ["bad.toml:2", "rule `local.bad`", "bad regex in `text`"] {
        assert!(err.contains(part), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
