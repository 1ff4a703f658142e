//! Fleet mode against a real `redis-server`: several instances together stay within a
//! destination's quota, a suspension or suppression set through one is seen by the
//! others within a second, and Redis stopped and restarted mid-run never shows the MTA
//! an error (local fallback, then rejoin, both visible in the metrics).

mod common;

use common::{free_port, Daemon, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// The tests measure rates: run them one at a time on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A throwaway `redis-server` on a free loopback port, without persistence, stopped by PID.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Redis {
    fn start() -> Redis {
        assert!(
            std::path::Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: the fleet tests need a real Redis; run integration/install-deps.sh as root"
        );
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: TempDir::new("redis"),
        };
        r.spawn();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGTERM to our own redis-server, then wait for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(redis: &Redis) -> String {
    format!(
        r#"[state]
backend = "redis"
redis_url = "{}"
redis_timeout = "50ms"
flush_interval = "200ms"
[providers.gmail]
domains = ["gmail.test"]
start_tier = "t8"
max_tier = "t8"
floor_tier = "t1"
[providers.yahoo]
domains = ["yahoo.test"]
"#,
        redis.url()
    )
}

fn start(redis: &Redis, n: usize) -> (Vec<TempDir>, Vec<Daemon>) {
    let dirs: Vec<TempDir> = (0..n).map(|_| TempDir::new("fleet")).collect();
    let daemons = dirs
        .iter()
        .map(|d| Daemon::start_in(&d.0, &config(redis), &[]).expect("mxpace starts"))
        .collect();
    (dirs, daemons)
}

/// One persistent socketmap connection, as Postfix's proxymap keeps them.
struct Socketmap(BufReader<TcpStream>);

impl Socketmap {
    fn open(addr: &str) -> Socketmap {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Socketmap(BufReader::new(s))
    }

    fn lookup(&mut self, map: &str, key: &str) -> std::io::Result<String> {
        let payload = format!("{map} {key}");
        let req = format!("{}:{payload},", payload.len());
        self.0.get_mut().write_all(req.as_bytes())?;
        let mut len = Vec::new();
        self.0.read_until(b':', &mut len)?;
        let n: usize = std::str::from_utf8(&len[..len.len().saturating_sub(1)])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let mut body = vec![0u8; n + 1];
        self.0.read_exact(&mut body)?;
        if body.pop() != Some(b',') {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        String::from_utf8(body).map_err(|_| std::io::ErrorKind::InvalidData.into())
    }
}

/// One policy connection (smtpd_access_policy).
struct Policy(BufReader<TcpStream>);

impl Policy {
    fn open(addr: &str) -> Policy {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Policy(BufReader::new(s))
    }

    fn ask(&mut self, attrs: &[(&str, &str)]) -> String {
        let mut req = String::new();
        for (k, v) in attrs {
            req.push_str(&format!("{k}={v}\n"));
        }
        req.push('\n');
        self.0.get_mut().write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        loop {
            let mut line = String::new();
            assert!(self.0.read_line(&mut line).unwrap() > 0, "policy EOF");
            if line == "\n" {
                return out;
            }
            out.push_str(&line);
        }
    }

    fn verdict(&mut self, rcpt: &str) -> String {
        self.ask(&[("request", "smtpd_access_policy"), ("recipient", rcpt)])
    }
}

/// The value of one series in a Prometheus scrape (0 when absent).
fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; the time it took.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the drivers saw: admissions with their time, holds, and anything else (errors).
#[derive(Default)]
struct Seen {
    admitted: Vec<Instant>,
    held: u64,
    errors: Vec<String>,
    slowest: Duration,
}

/// Threads that ask transport lookups for `rcpt_domain` every `every`, until stopped.
fn drive(
    addrs: &[String],
    per_instance: usize,
    rcpt_domain: &'static str,
    every: Duration,
    stop: &Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let counter = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for addr in addrs {
        for _ in 0..per_instance {
            let (addr, stop, seen, counter) =
                (addr.clone(), stop.clone(), seen.clone(), counter.clone());
            threads.push(std::thread::spawn(move || {
                let mut sm = Socketmap::open(&addr);
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    let answer = sm.lookup("transport", &format!("u{i}@{rcpt_domain}"));
                    let took = t0.elapsed();
                    let mut s = seen.lock().unwrap();
                    s.slowest = s.slowest.max(took);
                    match answer {
                        Ok(a) if a.starts_with("OK mxp_") => s.admitted.push(Instant::now()),
                        Ok(a) if a.starts_with("OK retry:4.7.0 mxpace:") => s.held += 1,
                        Ok(a) => s.errors.push(a),
                        Err(e) => {
                            s.errors.push(format!("connection: {e}"));
                            return;
                        }
                    }
                    drop(s);
                    std::thread::sleep(every);
                }
            }));
        }
    }
    (threads, seen)
}

#[test]
fn instances_together_stay_within_the_destination_quota() {
    let _serial = serial();
    let redis = Redis::start();
    let (_dirs, daemons) = start(&redis, 3);
    for d in &daemons {
        assert_eq!(metric(&d.scrape(), "mxpace_fleet_connected"), 1.0);
    }
    let addrs: Vec<String> = daemons.iter().map(|d| d.addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // 3 instances × 2 threads × ~100/s: about 12 times gmail's 50/s (tier t8).
    let (threads, seen) = drive(&addrs, 2, "gmail.test", Duration::from_millis(10), &stop);
    let t0 = Instant::now();
    // The first second drains the bucket; then 10 s at the steady rate.
    let (from, to) = (t0 + Duration::from_secs(2), t0 + Duration::from_secs(12));
    std::thread::sleep(to + Duration::from_millis(200) - Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.errors.is_empty(),
        "errors: {:?}",
        &seen.errors[..seen.errors.len().min(5)]
    );
    let in_window = seen
        .admitted
        .iter()
        .filter(|&&t| t >= from && t < to)
        .count() as f64;
    let quota = 50.0 * (to - from).as_secs_f64();
    let offered = seen.admitted.len() as f64 + seen.held as f64;
    let fallbacks: f64 = daemons
        .iter()
        .map(|d| metric(&d.scrape(), "mxpace_fleet_fallbacks_total"))
        .sum();
    println!(
        "3 instances: {in_window} admitted in 10 s against a quota of {quota} ({:+.1}%), {offered} lookups, {} held, {fallbacks} fallbacks, slowest answer {:?}",
        (in_window / quota - 1.0) * 100.0,
        seen.held,
        seen.slowest
    );
    assert!(
        offered > 3.0 * quota,
        "the drivers must offer well above the quota: {offered}"
    );
    assert!(
        (in_window - quota).abs() <= quota * 0.05,
        "combined admitted {in_window} is not within ±5% of the quota {quota}"
    );
    let via_redis: f64 = daemons
        .iter()
        .map(|d| metric(&d.scrape(), "mxpace_fleet_admissions_total{via=\"redis\"}"))
        .sum();
    assert!(
        via_redis >= offered * 0.9,
        "decisions were taken in Redis: {via_redis} of {offered}"
    );
}

#[test]
fn suspensions_and_suppressions_reach_the_other_instances_within_a_second() {
    let _serial = serial();
    let redis = Redis::start();
    let (_dirs, daemons) = start(&redis, 2);
    let (a, b) = (&daemons[0], &daemons[1]);
    let mut pb = Policy::open(&b.addr);
    let mut pa = Policy::open(&a.addr);
    assert_eq!(pb.verdict("x@gmail.test"), "action=DUNNO\n");

    let (ok, out) = a.ctl(&["suspend", "gmail", "--for", "1h"]);
    assert!(ok, "{out}");
    let took = within(Duration::from_secs(1), || {
        pb.verdict("x@gmail.test")
            .starts_with("action=DEFER_IF_PERMIT")
    });
    println!("suspension seen by the other instance after {took:?}");
    assert!(took.is_some(), "B did not see A's suspension within 1 s");
    let mut sm = Socketmap::open(&b.addr);
    let t = sm.lookup("transport", "y@gmail.test").unwrap();
    assert!(t.contains("destination suspended until"), "{t}");

    let (ok, out) = b.ctl(&["resume", "gmail"]);
    assert!(ok, "{out}");
    let took = within(Duration::from_secs(1), || {
        pa.verdict("x@gmail.test") == "action=DUNNO\n"
    });
    println!("resume seen by the other instance after {took:?}");
    assert!(took.is_some(), "A did not see B's resume within 1 s");

    // A hard bounce reported to A: B rejects the recipient at RCPT TO.
    let r = pa.ask(&[
        ("request", "delivery_report"),
        ("recipient", "gone@example.org"),
        (
            "reply",
            "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown in virtual mailbox table",
        ),
    ]);
    assert!(r.contains("action=REJECT"), "{r}");
    let took = within(Duration::from_secs(1), || {
        pb.verdict("gone@example.org")
            .starts_with("action=REJECT 5.1.1")
    });
    println!("suppression seen by the other instance after {took:?}");
    assert!(took.is_some(), "B did not see A's suppression within 1 s");
    // And the operator's unsuppress on B reaches A.
    let (ok, out) = b.ctl(&["unsuppress", "gone@example.org"]);
    assert!(ok, "{out}");
    assert!(
        within(Duration::from_secs(1), || pa.verdict("gone@example.org")
            == "action=DUNNO\n")
        .is_some(),
        "A did not see B's unsuppress within 1 s"
    );
}

#[test]
fn redis_stopped_and_restarted_mid_run_shows_the_mta_no_error() {
    let _serial = serial();
    let mut redis = Redis::start();
    let (_dirs, daemons) = start(&redis, 2);
    let (a, b) = (&daemons[0], &daemons[1]);
    // Shared state that must outlive the Redis restart (which loses all its data).
    let (ok, out) = a.ctl(&["suspend", "yahoo", "--for", "1h"]);
    assert!(ok, "{out}");

    let addrs: Vec<String> = daemons.iter().map(|d| d.addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (threads, seen) = drive(&addrs, 2, "gmail.test", Duration::from_millis(5), &stop);
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<String> = daemons.iter().map(|d| d.scrape()).collect();
    for s in &before {
        assert_eq!(metric(s, "mxpace_fleet_connected"), 1.0);
        assert_eq!(metric(s, "mxpace_fleet_fallbacks_total"), 0.0);
    }

    redis.stop();
    let fell_back = within(Duration::from_secs(5), || {
        daemons.iter().all(|d| {
            let s = d.scrape();
            metric(&s, "mxpace_fleet_connected") == 0.0
                && metric(&s, "mxpace_fleet_fallbacks_total") >= 1.0
        })
    });
    assert!(fell_back.is_some(), "the instances did not fall back");
    let answered = || {
        let s = seen.lock().unwrap();
        s.admitted.len() as u64 + s.held
    };
    let answered_before = answered();
    std::thread::sleep(Duration::from_secs(1));
    // During the outage: a suppression on A, decisions local, answers keep coming.
    let mut pa = Policy::open(&a.addr);
    let r = pa.ask(&[
        ("request", "delivery_report"),
        ("recipient", "lost@example.org"),
        (
            "reply",
            "550 5.1.1 <lost@example.org>: Recipient address rejected: User unknown",
        ),
    ]);
    assert!(r.contains("action=REJECT"), "{r}");
    let answered_during = answered() - answered_before;
    assert!(
        answered_during > 50,
        "lookups went unanswered during the outage: {answered_during}"
    );
    for d in &daemons {
        let s = d.scrape();
        assert!(
            metric(&s, "mxpace_fleet_admissions_total{via=\"local\"}") > 0.0,
            "no local decisions during the outage"
        );
    }

    redis.spawn();
    let rejoined = within(Duration::from_secs(10), || {
        daemons
            .iter()
            .all(|d| metric(&d.scrape(), "mxpace_fleet_connected") == 1.0)
    });
    println!("outage: fell back after {fell_back:?}, rejoined {rejoined:?} after the restart");
    assert!(rejoined.is_some(), "the instances did not rejoin");
    let via_redis: Vec<f64> = daemons
        .iter()
        .map(|d| metric(&d.scrape(), "mxpace_fleet_admissions_total{via=\"redis\"}"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for (d, v) in daemons.iter().zip(&via_redis) {
        let now = metric(&d.scrape(), "mxpace_fleet_admissions_total{via=\"redis\"}");
        assert!(now > *v, "decisions did not return to Redis: {v} → {now}");
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    println!(
        "{} admitted, {} held, slowest answer {:?}",
        seen.admitted.len(),
        seen.held,
        seen.slowest
    );
    assert!(
        seen.errors.is_empty(),
        "errors reached the MTA: {:?}",
        &seen.errors[..seen.errors.len().min(5)]
    );

    // What changed during the outage reached the other instance after the rejoin,
    // and a new instance learns the state kept from before the restart.
    let mut pb = Policy::open(&b.addr);
    assert!(
        within(Duration::from_secs(2), || pb
            .verdict("lost@example.org")
            .starts_with("action=REJECT 5.1.1"))
        .is_some(),
        "a suppression made during the outage did not reach the other instance"
    );
    let dir = TempDir::new("fleet-late");
    let c = Daemon::start_in(&dir.0, &config(&redis), &[]).unwrap();
    let mut pc = Policy::open(&c.addr);
    let v = pc.verdict("someone@yahoo.test");
    assert!(
        v.starts_with("action=DEFER_IF_PERMIT"),
        "the suspension from before the restart was not re-seeded: {v}"
    );
    assert!(pc
        .verdict("lost@example.org")
        .starts_with("action=REJECT 5.1.1"));
}
