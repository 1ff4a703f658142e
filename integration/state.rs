//! State that survives restarts: acknowledged suppressions and suspensions survive
//! SIGKILL under load, adaptive state survives within the flush interval, the operator
//! can export and import the suppression list, and a corrupt file stops the start with
//! a way forward instead of a silent wipe.

mod common;

use common::{Daemon, TempDir};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONFIG: &str = "[providers.yahoo]\ndomains = [\"yahoo.test\"]\nsuspend_after = 2\nsuspend_for = \"2h\"\n[providers.gmail]\ndomains = [\"gmail.test\"]\n[state]\nflush_interval = \"200ms\"\n";

/// One persistent policy connection, as Postfix keeps them.
struct Conn(BufReader<TcpStream>);

impl Conn {
    fn open(addr: &str) -> Conn {
        Conn(BufReader::new(TcpStream::connect(addr).unwrap()))
    }

    fn ask(&mut self, attrs: &[(&str, &str)]) -> std::io::Result<String> {
        let mut req = String::new();
        for (k, v) in attrs {
            req.push_str(&format!("{k}={v}\n"));
        }
        req.push('\n');
        self.0.get_mut().write_all(req.as_bytes())?;
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.0.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\n" {
                return Ok(out);
            }
            out.push_str(&line);
        }
    }
}

fn report(c: &mut Conn, rcpt: &str, reply: &str) -> std::io::Result<String> {
    c.ask(&[
        ("request", "delivery_report"),
        ("recipient", rcpt),
        ("reply", reply),
    ])
}

#[test]
fn acknowledged_suppressions_and_suspensions_survive_sigkill_under_load() {
    let dir = TempDir::new("state-kill");
    let mut d = Daemon::start_in(&dir.0, CONFIG, &[]).unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    // Background load: deliveries and throttles on other connections.
    for w in 0..3 {
        let (addr, stop) = (d.addr.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            let mut c = Conn::open(&addr);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let reply = if i % 50 == 0 { "421 4.7.28 Gmail has detected an unusual rate of unsolicited email originating from your IP address." } else { "250 2.0.0 OK - gsmtp" };
                if report(&mut c, &format!("w{w}-{i}@gmail.test"), reply).is_err() {
                    break;
                }
            }
        }));
    }
    // Hard bounces: every one answered is a promise.
    {
        let (addr, stop, acked) = (d.addr.clone(), stop.clone(), acked.clone());
        workers.push(std::thread::spawn(move || {
            let mut c = Conn::open(&addr);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let rcpt = format!("gone{i}@example.org");
                match report(&mut c, &rcpt, "550 5.1.1 <x>: Recipient address rejected: User unknown in virtual mailbox table") {
                    Ok(a) if a.contains("action=REJECT") => acked.lock().unwrap().push(rcpt),
                    Ok(a) => panic!("unexpected answer {a}"),
                    Err(_) => break,
                }
            }
        }));
    }
    // A suspension by reputation blocks, answered before the kill.
    let mut c = Conn::open(&d.addr);
    for i in 0..2 {
        report(&mut c, &format!("y{i}@yahoo.test"), "421 4.7.0 [TS03] All messages from 203.0.113.7 will be permanently deferred; Retrying will NOT succeed.").unwrap();
    }
    let p = c
        .ask(&[
            ("request", "smtpd_access_policy"),
            ("recipient", "z@yahoo.test"),
        ])
        .unwrap();
    assert!(p.starts_with("action=DEFER_IF_PERMIT"), "{p}");
    // And one by the operator.
    let (ok, out) = d.ctl(&["suspend", "gmail", "--for", "1h"]);
    assert!(ok, "{out}");

    std::thread::sleep(Duration::from_millis(700));
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load produced only {} suppressions",
        acked.len()
    );

    let d2 = Daemon::start_in(&dir.0, CONFIG, &[]).unwrap();
    let mut c = Conn::open(&d2.addr);
    for rcpt in &acked {
        let a = c
            .ask(&[("request", "smtpd_access_policy"), ("recipient", rcpt)])
            .unwrap();
        assert!(
            a.starts_with("action=REJECT 5.1.1"),
            "acknowledged suppression of {rcpt} lost after kill -9: {a}"
        );
        assert!(
            a.contains("suppressed since") && a.contains("recipient_unknown"),
            "{a}"
        );
    }
    for site in ["yahoo.test", "gmail.test"] {
        let a = c
            .ask(&[
                ("request", "smtpd_access_policy"),
                ("recipient", &format!("new@{site}")),
            ])
            .unwrap();
        assert!(
            a.starts_with("action=DEFER_IF_PERMIT"),
            "suspension of {site} lost after kill -9: {a}"
        );
    }
    println!(
        "{} acknowledged suppressions and 2 suspensions survived SIGKILL",
        acked.len()
    );
}

#[test]
fn adaptive_state_survives_within_the_flush_interval() {
    let dir = TempDir::new("state-adaptive");
    let mut d = Daemon::start_in(&dir.0, CONFIG, &[]).unwrap();
    let mut c = Conn::open(&d.addr);
    let before = c
        .ask(&[("request", "destination_query"), ("domain", "gmail.test")])
        .unwrap();
    // The first throttles of an episode are forgiven; the third slows the destination.
    let mut a = String::new();
    for i in 0..3 {
        a = report(&mut c, &format!("a{i}@gmail.test"), "421 4.7.28 Gmail has detected an unusual rate of unsolicited email originating from your IP address.").unwrap();
    }
    let rate_of = |s: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix("rate="))
            .unwrap_or_else(|| panic!("no rate in {s}"))
            .parse()
            .unwrap()
    };
    assert!(rate_of(&a) < rate_of(&before), "throttled: {before} → {a}");
    std::thread::sleep(Duration::from_millis(800)); // > flush_interval
    d.kill9();
    let d2 = Daemon::start_in(&dir.0, CONFIG, &[]).unwrap();
    let mut c = Conn::open(&d2.addr);
    let after = c
        .ask(&[("request", "destination_query"), ("domain", "gmail.test")])
        .unwrap();
    assert_eq!(rate_of(&after), rate_of(&a), "tier after restart: {after}");
}

#[test]
fn suppressions_export_and_import_as_csv() {
    let d = Daemon::start(CONFIG);
    let mut c = Conn::open(&d.addr);
    for who in ["a@example.org", "b@example.net"] {
        report(
            &mut c,
            who,
            "550 5.1.1 <x>: Recipient address rejected: User unknown in virtual mailbox table",
        )
        .unwrap();
    }
    let csv = d.dir.join("export.csv");
    let (ok, out) = d.ctl(&["export-suppressions", csv.to_str().unwrap()]);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("address,since,class,reply\n"), "{text}");
    assert!(
        text.contains("a@example.org,") && text.contains("b@example.net,"),
        "{text}"
    );
    for who in ["a@example.org", "b@example.net"] {
        let (ok, out) = d.ctl(&["unsuppress", who]);
        assert!(ok, "{out}");
    }
    let a = c
        .ask(&[
            ("request", "smtpd_access_policy"),
            ("recipient", "a@example.org"),
        ])
        .unwrap();
    assert_eq!(a, "action=DUNNO\n");
    let (ok, out) = d.ctl(&["import-suppressions", csv.to_str().unwrap()]);
    assert!(ok && out.contains("2 suppressions imported"), "{out}");
    let a = c
        .ask(&[
            ("request", "smtpd_access_policy"),
            ("recipient", "B@Example.net"),
        ])
        .unwrap();
    assert!(a.starts_with("action=REJECT 5.1.1"), "{a}");
    // The state file is plain SQLite: an operator can inspect it with sqlite3.
    let (ok, out) = d.ctl(&["unsuppress", "nobody@example.org"]);
    assert!(!ok && out.contains("not suppressed"), "{out}");
}

#[test]
fn corrupt_state_file_stops_the_start_with_a_way_forward() {
    let dir = TempDir::new("state-corrupt");
    std::fs::write(
        dir.0.join("state.db"),
        b"this is not a database, it is a text file\n".repeat(200),
    )
    .unwrap();
    let err = match Daemon::start_in(&dir.0, CONFIG, &[]) {
        Ok(_) => panic!("started on a corrupt state file"),
        Err(log) => log,
    };
    assert!(
        err.contains("unreadable") && err.contains("mv ") && err.contains("--quarantine-bad-state"),
        "{err}"
    );
    assert!(
        dir.0.join("state.db").exists(),
        "the bad file is kept, never wiped"
    );
    // The documented way forward: move it aside and start fresh.
    let d = Daemon::start_in(&dir.0, CONFIG, &["--quarantine-bad-state"]).unwrap();
    let kept_aside = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("state.db.bad-"));
    assert!(kept_aside, "the unreadable file is kept beside the new one");
    drop(d);
}
