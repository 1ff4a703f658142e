//! The real `mxpace serve` binary over real sockets: vector replay, pipelining,
//! concurrency, bad input and limits, reload, shutdown, `check-config`, JSON logs.
//!
//! Every test starts its own daemon on 127.0.0.1 port 0 (and a Unix socket where
//! useful) with its own state file, waits for the `listening on ADDR` lines on standard
//! error, and stops it by PID with SIGTERM, expecting exit status 0 — also when the
//! test fails, through [`Daemon`]'s `Drop`.

use mxpace::protocol::vectors::{builtin_cases, pattern_matches, split_response, Case};
use mxpace::protocol::Protocol;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mxpace");
/// Upper bound for anything that should happen promptly; only reached when broken.
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Harness: temp dirs, the daemon process, connections, metrics.

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Short: a Unix socket path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!("mxp-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Opts {
    /// Config file text; the embedded default when `None`.
    config: Option<String>,
    /// Also listen on a Unix socket.
    unix: bool,
    /// Keep the configured listeners (no `--listen`).
    configured_listeners: bool,
    log_json: bool,
}

/// A running `mxpace serve`, stopped with SIGTERM on drop.
struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    log: Arc<Mutex<Vec<String>>>,
    /// Collects standard error into `log`; joined once the daemon has exited.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Bound addresses in the order of the `listening on` lines.
    listening: Vec<String>,
    metrics: SocketAddr,
}

/// The address after `marker` in a log line, up to the first of `stops` (text and
/// JSON logs alike).
fn address_after<'a>(line: &'a str, marker: &str, stops: &[char]) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || stops.contains(&c))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

impl Daemon {
    fn start(opts: Opts) -> Daemon {
        let dir = TempDir::new("d");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        if let Some(text) = &opts.config {
            let path = dir.path("mxpace.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(&path);
        }
        let mut expected = 1;
        if !opts.configured_listeners {
            cmd.args(["--listen", "127.0.0.1:0"]);
            if opts.unix {
                cmd.arg("--listen")
                    .arg(format!("unix:{}", dir.path("mxpace.sock").display()));
                expected = 2;
            }
        } else {
            expected = opts
                .config
                .as_deref()
                .unwrap_or("")
                .matches("[[server.listeners]]")
                .count();
        }
        // Port 0 everywhere: the bound metrics address is read back from the log.
        cmd.args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--state")
        .arg(dir.path("state.db"));
        if opts.log_json {
            cmd.arg("--log-json");
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mxpace");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            })
        };
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            log,
            reader: Some(reader),
            listening: Vec::new(),
            metrics: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let lines = daemon.log.lock().unwrap().clone();
            daemon.listening = lines
                .iter()
                .filter_map(|l| address_after(l, "listening on ", &['"']).map(str::to_string))
                .collect();
            let metrics = lines
                .iter()
                .find_map(|l| address_after(l, "metrics on http://", &['/', '"']));
            if daemon.listening.len() >= expected {
                daemon.metrics = metrics
                    .expect("metrics line before the listening lines")
                    .parse()
                    .unwrap();
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mxpace exited early ({status}):\n{}", lines.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "no listening lines:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn tcp(&self) -> SocketAddr {
        self.listening
            .iter()
            .find(|a| !a.starts_with("unix:"))
            .expect("a TCP listener")
            .parse()
            .unwrap()
    }

    fn unix(&self) -> PathBuf {
        let a = self
            .listening
            .iter()
            .find(|a| a.starts_with("unix:"))
            .expect("a Unix listener");
        PathBuf::from(&a["unix:".len()..])
    }

    fn connect(&self, via: Via) -> Conn {
        match via {
            Via::Tcp => Conn::tcp(self.tcp()),
            Via::Unix => Conn::unix(&self.unix()),
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig}");
    }

    fn scrape(&self) -> String {
        scrape(self.metrics)
    }

    /// Waits until `/metrics` shows `name{labels}` at `at_least`; returns its value.
    fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let body = self.scrape();
            if let Some(v) = metric(&body, name, labels).filter(|v| *v >= at_least) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} never reached {at_least}:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (killed after [`PATIENCE`]).
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("still running");
        let _ = Command::new("kill")
            .args(["-s", "TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // The whole log is there once the pipe has been read to its end.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mxpace did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the daemon and asserts a clean exit.
    fn stop(mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "exit status {status}:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let status = self.terminate();
            if !std::thread::panicking() {
                assert!(
                    status.success(),
                    "exit status {status}:\n{}",
                    self.log_text()
                );
            }
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Via {
    Tcp,
    Unix,
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn tcp(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn::Tcp(s)
    }

    fn unix(path: &Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Conn::Unix(s)
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    fn set_read_timeout(&self, t: Duration) {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }

    /// Reads until `n` whole responses have arrived (or the stream ends); returns them.
    fn responses(&mut self, protocol: Protocol, n: usize, buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            while out.len() < n {
                match split_response(protocol, buf) {
                    Some(len) => out.push(buf.drain(..len).collect()),
                    None => break,
                }
            }
            if out.len() == n {
                return out;
            }
            match self.read(&mut chunk) {
                Ok(0) => return out,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
                Err(e) => panic!(
                    "reading responses ({} of {n} so far, pending {:?}): {e}",
                    out.len(),
                    String::from_utf8_lossy(buf)
                ),
            }
        }
    }

    /// Whether the daemon closes the connection with nothing more to say.
    fn closed(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 1024];
        match self.read(&mut chunk) {
            Ok(0) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Ok(k) => Err(format!(
                "unexpected bytes {:?}",
                String::from_utf8_lossy(&chunk[..k])
            )),
            Err(e) => Err(format!("not closed: {e}")),
        }
    }

    /// One request, one response.
    fn ask(&mut self, protocol: Protocol, request: &[u8]) -> String {
        self.write_all(request).unwrap();
        let mut buf = Vec::new();
        let got = self.responses(protocol, 1, &mut buf);
        assert_eq!(
            got.len(),
            1,
            "no answer to {:?}",
            String::from_utf8_lossy(request)
        );
        assert!(
            buf.is_empty(),
            "extra bytes {:?}",
            String::from_utf8_lossy(&buf)
        );
        String::from_utf8(got.into_iter().next().unwrap()).unwrap()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `GET /metrics` with a plain HTTP/1.1 request; returns the body.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Value of the sample `name{labels…}` whose labels include every one of `labels`
/// (summed over the samples that match).
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (set, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((set, value)) = r.split_once("} ") else {
                continue;
            };
            (set, value)
        } else if let Some(value) = rest.strip_prefix(' ') {
            ("", value)
        } else {
            continue;
        };
        if labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            let v: f64 = value.trim().parse().unwrap();
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > 300 {
        let head: String = text.chars().take(300).collect();
        format!("{head}… ({} bytes)", bytes.len())
    } else {
        text.into_owned()
    }
}

/// A response as text; for socketmap, the netstring's payload.
fn payload(protocol: Protocol, response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    match protocol {
        Protocol::Socketmap => text
            .split_once(':')
            .and_then(|(_, rest)| rest.strip_suffix(','))
            .unwrap_or_else(|| panic!("not a netstring: {text:?}"))
            .to_string(),
        _ => text.into_owned(),
    }
}

/// Sends a case's requests (in one write, or in `chunk`-byte writes) and checks the
/// responses and, for `!!! close` cases, that the daemon closes the connection.
fn replay(daemon: &Daemon, via: Via, protocol: Protocol, case: &Case, chunk: usize) {
    let what = format!(
        "{protocol:?} {:?} (line {}) over {via:?}",
        case.name, case.line
    );
    let mut conn = daemon.connect(via);
    let mut sent = Ok(());
    for part in case.request.chunks(chunk) {
        sent = conn.write_all(part);
        if sent.is_err() {
            break;
        }
    }
    // A case that closes may be cut off by the daemon before its input is all written.
    if let Err(e) = &sent {
        assert!(case.closes, "{what}: write failed: {e}");
    }
    if case.closes {
        // The cut-off cases need the end of the stream; the others close by themselves.
        conn.shutdown_write();
    }
    let mut buf = Vec::new();
    let got = conn.responses(protocol, case.responses.len(), &mut buf);
    assert_eq!(
        got.len(),
        case.responses.len(),
        "{what}: got {:?}",
        got.iter().map(|r| show(r)).collect::<Vec<_>>()
    );
    for (i, (response, expected)) in got.iter().zip(&case.responses).enumerate() {
        assert!(
            expected.matches(response),
            "{what}: response {i}: {:?} does not match {:?}",
            show(response),
            expected.pattern
        );
    }
    assert!(buf.is_empty(), "{what}: extra bytes {:?}", show(&buf));
    if case.closes {
        conn.closed().unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Policy, Protocol::Socketmap, Protocol::JsonLines];

fn netstring(payload: &str) -> Vec<u8> {
    format!("{}:{payload},", payload.len()).into_bytes()
}

/// One well-formed request and a pattern of its answer, per protocol.
fn good_request(protocol: Protocol, i: usize) -> (Vec<u8>, &'static str) {
    match protocol {
        Protocol::Policy => (
            format!("request=smtpd_access_policy\nrecipient=u{i}@example.com\n\n").into_bytes(),
            "action=DUNNO\n\n",
        ),
        Protocol::Socketmap => (
            netstring(&format!("transport u{i}@example.com")),
            "NOTFOUND ",
        ),
        Protocol::JsonLines => (
            format!("{{\"request\":\"smtpd_access_policy\",\"recipient\":\"u{i}@example.com\"}}\n")
                .into_bytes(),
            "{\"action\":\"DUNNO\"}\n",
        ),
    }
}

/// A good request on a fresh connection is answered: the daemon is still serving.
fn assert_serving(daemon: &Daemon, via: Via) {
    for p in PROTOCOLS {
        let (req, want) = good_request(p, 0);
        let mut conn = daemon.connect(via);
        let got = conn.ask(p, &req);
        assert_eq!(payload(p, got.as_bytes()), want, "{p:?}");
    }
}

// ---------------------------------------------------------------------------------
// Vectors, pipelining, concurrency.

/// Each vector file assumes a fresh daemon (reports change a destination's state), so
/// every file gets its own daemon per transport and per way of writing.
#[test]
fn vectors_replay_over_tcp_and_unix() {
    for protocol in PROTOCOLS {
        let cases = builtin_cases(protocol);
        assert!(!cases.is_empty());
        for via in [Via::Tcp, Via::Unix] {
            let daemon = Daemon::start(Opts {
                unix: true,
                ..Opts::default()
            });
            for case in &cases {
                replay(&daemon, via, protocol, case, usize::MAX);
            }
            daemon.stop();
        }
        // Split writes: the same answers whatever the segmentation.
        let daemon = Daemon::start(Opts {
            unix: true,
            ..Opts::default()
        });
        for case in cases.iter().filter(|c| c.request.len() < 4096) {
            replay(&daemon, Via::Unix, protocol, case, 7);
        }
        daemon.stop();
    }
}

/// 200 requests in one write on one connection; the answers come back in order
/// (requests alternate between kinds whose answers differ).
#[test]
fn pipelined_requests_answered_in_order() {
    let daemon = Daemon::start(Opts {
        unix: true,
        ..Opts::default()
    });
    const N: usize = 200;
    for via in [Via::Tcp, Via::Unix] {
        for protocol in PROTOCOLS {
            let mut batch = Vec::new();
            let mut want = Vec::new();
            for i in 0..N {
                let (req, pattern): (Vec<u8>, String) = match (protocol, i % 3) {
                    (Protocol::Policy, 0) => (
                        format!("request=smtpd_access_policy\nrecipient=u{i}@example.com\n\n")
                            .into_bytes(),
                        "action=DUNNO\n\n".into(),
                    ),
                    (Protocol::Policy, 1) => (
                        format!("request=destination_query\nrecipient=u{i}@gmail.com\n\n")
                            .into_bytes(),
                        "action=DUNNO\nprovider=gmail\nstage=trusted\nretry_after=0\nconcurrency={any}\nrate={any}\n\n".into(),
                    ),
                    (Protocol::Policy, _) => (
                        format!("request=delivery_report\nrecipient=u{i}@yahoo.com\nreply=250 2.0.0 ok {i}\n\n")
                            .into_bytes(),
                        "action=DUNNO\nclass=delivered\nprovider=yahoo\nblamed=none\nstage={any}\nretry_after={any}\nconcurrency={any}\nrate={any}\n\n".into(),
                    ),
                    (Protocol::Socketmap, 0) => (
                        netstring(&format!("transport u{i}@example.com")),
                        "NOTFOUND ".into(),
                    ),
                    (Protocol::Socketmap, 1) => (
                        netstring(&format!("nosuchmap{i} key")),
                        "PERM unknown request type".into(),
                    ),
                    (Protocol::Socketmap, _) => (
                        netstring(&format!("status 2.0.0 250 2.0.0 Ok: queued as {i}")),
                        "NOTFOUND ".into(),
                    ),
                    (Protocol::JsonLines, 0) => (
                        format!("{{\"request\":\"smtpd_access_policy\",\"recipient\":\"u{i}@example.com\"}}\n")
                            .into_bytes(),
                        "{\"action\":\"DUNNO\"}\n".into(),
                    ),
                    (Protocol::JsonLines, 1) => (
                        format!("{{\"request\":\"frobnicate{i}\"}}\n").into_bytes(),
                        "{\"action\":\"DUNNO\",\"error\":\"unknown request type\"}\n".into(),
                    ),
                    (Protocol::JsonLines, _) => (
                        format!("{{\"request\":\"delivery_report\",\"recipient\":\"u{i}@yahoo.com\",\"reply\":\"250 2.0.0 ok {i}\"}}\n")
                            .into_bytes(),
                        "{\"action\":\"DUNNO\",\"class\":\"delivered\",\"provider\":\"yahoo\",{text}}\n".into(),
                    ),
                };
                batch.extend_from_slice(&req);
                want.push(pattern);
            }
            let mut conn = daemon.connect(via);
            conn.write_all(&batch).unwrap();
            let mut buf = Vec::new();
            let got = conn.responses(protocol, N, &mut buf);
            assert_eq!(got.len(), N, "{protocol:?} over {via:?}");
            for (i, (r, w)) in got.iter().zip(&want).enumerate() {
                let text = payload(protocol, r);
                assert!(
                    pattern_matches(w, &text),
                    "{protocol:?} over {via:?}: answer {i} {text:?} does not match {w:?}"
                );
            }
            assert!(buf.is_empty());
            // The connection stays usable after the burst.
            let (req, want) = good_request(protocol, 1);
            let again = conn.ask(protocol, &req);
            assert_eq!(payload(protocol, again.as_bytes()), want);
        }
    }
    daemon.stop();
}

/// 300 connections open at once, over TCP and Unix, each asking several questions.
#[test]
fn hundreds_of_concurrent_connections() {
    let daemon = Arc::new(Daemon::start(Opts {
        unix: true,
        ..Opts::default()
    }));
    const CONNS: usize = 300;
    const REQUESTS: usize = 5;
    let barrier = Arc::new(Barrier::new(CONNS));
    let threads: Vec<_> = (0..CONNS)
        .map(|c| {
            let daemon = daemon.clone();
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let via = if c % 2 == 0 { Via::Tcp } else { Via::Unix };
                    let protocol = PROTOCOLS[c % 3];
                    let mut conn = daemon.connect(via);
                    // Everyone connected before anyone asks: all 300 are open at once.
                    barrier.wait();
                    for r in 0..REQUESTS {
                        let (req, want) = good_request(protocol, c * 100 + r);
                        let got = conn.ask(protocol, &req);
                        assert!(got.contains(want), "{protocol:?} {via:?}: {got:?}");
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every answer was counted by protocol.
    for p in PROTOCOLS {
        daemon.wait_metric(
            "mxpace_request_duration_seconds_count",
            &[("protocol", p.as_str())],
            (CONNS / 3 * REQUESTS) as f64,
        );
    }
    Arc::try_unwrap(daemon).ok().unwrap().stop();
}

// ---------------------------------------------------------------------------------
// Bad input and limits.

/// Limits below the defaults, so that the config is what is enforced.
const LIMITS_CONFIG: &str = r#"
[server]
idle_timeout = "30s"
request_timeout = "300ms"
max_line_bytes = 512
max_attributes = 8
max_request_bytes = 2048
max_netstring_bytes = 1000
max_json_bytes = 1000
"#;

struct BadCase {
    name: &'static str,
    protocol: Protocol,
    request: Vec<u8>,
    /// Expected answers (payloads for socketmap), with `{any}` / `{text}`.
    answers: &'static [&'static str],
    /// Half-close after writing (the request is cut off by the end of the stream).
    eof: bool,
    closes: bool,
    /// `mxpace_protocol_errors_total{protocol, kind}` that must be counted.
    counter: Option<(&'static str, &'static str)>,
}

fn bad_cases() -> Vec<BadCase> {
    let policy_ok = b"request=smtpd_access_policy\nrecipient=bob@example.com\n\n".to_vec();
    let sm_ok = netstring("transport *");
    let json_ok = b"{\"request\":\"smtpd_access_policy\"}\n".to_vec();
    let cat = |parts: &[&[u8]]| parts.concat();
    let long = "x".repeat(600);
    vec![
        BadCase {
            name: "policy line longer than max_line_bytes",
            protocol: Protocol::Policy,
            request: cat(&[
                b"request=delivery_report\nreply=",
                long.as_bytes(),
                b"\nrecipient=a@b.test\n\n",
                &policy_ok,
            ]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "line_too_long")),
        },
        BadCase {
            name: "policy request larger than max_request_bytes",
            protocol: Protocol::Policy,
            request: cat(&[
                b"request=delivery_report\n",
                format!("a={}\n", "y".repeat(500)).repeat(5).as_bytes(),
                b"\n",
                &policy_ok,
            ]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "request_too_large")),
        },
        BadCase {
            name: "policy: more than max_attributes",
            protocol: Protocol::Policy,
            request: cat(&[b"request=smtpd_access_policy\n", "x=1\n".repeat(9).as_bytes(), b"\n", &policy_ok]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "too_many_attributes")),
        },
        BadCase {
            name: "policy invalid UTF-8",
            protocol: Protocol::Policy,
            request: cat(&[b"request=delivery_report\nreply=550 Bo\xeete\n\n", &policy_ok]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "invalid_utf8")),
        },
        BadCase {
            name: "policy line without '='",
            protocol: Protocol::Policy,
            request: cat(&[b"request=smtpd_access_policy\nnonsense\n\n", &policy_ok]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "malformed")),
        },
        BadCase {
            name: "policy unknown attributes are ignored",
            protocol: Protocol::Policy,
            request: b"request=delivery_report\nrecipient=u@gmail.com\nx_frob=1\nreply=250 2.0.0 OK\nzz=\n\n".to_vec(),
            answers: &["action=DUNNO\nclass=delivered\nprovider=gmail\nblamed=none\nstage={any}\nretry_after={any}\nconcurrency={any}\nrate={any}\n\n"],
            eof: false,
            closes: false,
            counter: None,
        },
        BadCase {
            name: "policy unknown request type",
            protocol: Protocol::Policy,
            request: cat(&[b"request=frobnicate\n\n", &policy_ok]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: false,
            closes: false,
            counter: Some(("policy", "unknown_request")),
        },
        BadCase {
            name: "policy request truncated by close",
            protocol: Protocol::Policy,
            request: cat(&[&policy_ok, b"request=smtpd_access_policy\nrecipient=bob@ex"]),
            answers: &["action=DUNNO\n\n", "action=DUNNO\n\n"],
            eof: true,
            closes: true,
            counter: Some(("policy", "truncated")),
        },
        BadCase {
            name: "socketmap netstring longer than max_netstring_bytes",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"1001:", "x".repeat(1001).as_bytes(), b","]),
            answers: &["NOTFOUND ", "PERM netstring too long"],
            eof: false,
            closes: true,
            counter: Some(("socketmap", "too_long")),
        },
        BadCase {
            name: "socketmap huge length prefix",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"99999999999999:x,"]),
            answers: &["NOTFOUND ", "PERM netstring too long"],
            eof: false,
            closes: true,
            counter: Some(("socketmap", "too_long")),
        },
        BadCase {
            name: "socketmap bad length",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"1x:a,"]),
            answers: &["NOTFOUND ", "PERM bad netstring length"],
            eof: false,
            closes: true,
            counter: Some(("socketmap", "bad_length")),
        },
        BadCase {
            name: "socketmap bad terminator",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"11:transport *;"]),
            answers: &["NOTFOUND ", "PERM netstring not terminated by ','"],
            eof: false,
            closes: true,
            counter: Some(("socketmap", "missing_comma")),
        },
        BadCase {
            name: "socketmap invalid UTF-8",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"12:status 5.1.\xee,", &sm_ok]),
            answers: &["NOTFOUND ", "PERM invalid UTF-8 in socketmap request", "NOTFOUND "],
            eof: false,
            closes: false,
            counter: Some(("socketmap", "invalid_utf8")),
        },
        BadCase {
            name: "socketmap unknown map",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, &netstring("virtual a@b.test"), &sm_ok]),
            answers: &["NOTFOUND ", "PERM unknown request type", "NOTFOUND "],
            eof: false,
            closes: false,
            counter: Some(("socketmap", "unknown_request")),
        },
        BadCase {
            name: "socketmap truncated by close",
            protocol: Protocol::Socketmap,
            request: cat(&[&sm_ok, b"25:transport bob@exa"]),
            answers: &["NOTFOUND ", "PERM truncated netstring"],
            eof: true,
            closes: true,
            counter: Some(("socketmap", "truncated")),
        },
        BadCase {
            name: "json line longer than max_json_bytes",
            protocol: Protocol::JsonLines,
            request: cat(&[b"{\"request\":\"delivery_report\",\"reply\":\"", "z".repeat(1200).as_bytes(), b"\"}\n", &json_ok]),
            answers: &["{\"action\":\"DUNNO\",\"error\":\"line too long\"}\n", "{\"action\":\"DUNNO\"}\n"],
            eof: false,
            closes: false,
            counter: Some(("jsonl", "line_too_long")),
        },
        BadCase {
            name: "json invalid UTF-8",
            protocol: Protocol::JsonLines,
            request: cat(&[b"{\"request\":\"delivery_report\",\"reply\":\"\xff\"}\n", &json_ok]),
            answers: &["{\"action\":\"DUNNO\",\"error\":\"invalid UTF-8\"}\n", "{\"action\":\"DUNNO\"}\n"],
            eof: false,
            closes: false,
            counter: Some(("jsonl", "invalid_utf8")),
        },
        BadCase {
            name: "json not JSON",
            protocol: Protocol::JsonLines,
            request: cat(&[b"{nope\n", &json_ok]),
            answers: &["{\"action\":\"DUNNO\",\"error\":\"invalid JSON request\"}\n", "{\"action\":\"DUNNO\"}\n"],
            eof: false,
            closes: false,
            counter: Some(("jsonl", "invalid_json")),
        },
        BadCase {
            name: "json unknown fields ignored",
            protocol: Protocol::JsonLines,
            request: b"{\"request\":\"delivery_report\",\"recipient\":\"u@gmail.com\",\"x\":[1,{\"y\":2}],\"reply\":\"250 2.0.0 OK\"}\n".to_vec(),
            answers: &["{\"action\":\"DUNNO\",\"class\":\"delivered\",\"provider\":\"gmail\",{text}}\n"],
            eof: false,
            closes: false,
            counter: None,
        },
        BadCase {
            name: "json unknown request type",
            protocol: Protocol::JsonLines,
            request: cat(&[b"{\"request\":\"frob\"}\n", &json_ok]),
            answers: &["{\"action\":\"DUNNO\",\"error\":\"unknown request type\"}\n", "{\"action\":\"DUNNO\"}\n"],
            eof: false,
            closes: false,
            counter: Some(("jsonl", "unknown_request")),
        },
        BadCase {
            name: "json truncated by close",
            protocol: Protocol::JsonLines,
            request: cat(&[&json_ok, b"{\"request\":\"smtpd_acc"]),
            answers: &["{\"action\":\"DUNNO\"}\n", "{\"action\":\"DUNNO\",\"error\":\"truncated line\"}\n"],
            eof: true,
            closes: true,
            counter: Some(("jsonl", "truncated")),
        },
    ]
}

#[test]
fn bad_input_gets_error_replies_and_counters() {
    let daemon = Daemon::start(Opts {
        config: Some(LIMITS_CONFIG.into()),
        unix: true,
        ..Opts::default()
    });
    for case in bad_cases() {
        let what = case.name;
        let before = metric(
            &daemon.scrape(),
            "mxpace_protocol_errors_total",
            &case
                .counter
                .map(|(p, k)| vec![("protocol", p), ("kind", k)])
                .unwrap_or_default(),
        )
        .unwrap_or(0.0);
        let mut conn = daemon.connect(Via::Tcp);
        let written = conn.write_all(&case.request);
        if let Err(e) = written {
            assert!(case.closes, "{what}: write failed: {e}");
        }
        if case.eof {
            conn.shutdown_write();
        }
        let mut buf = Vec::new();
        let got = conn.responses(case.protocol, case.answers.len(), &mut buf);
        assert_eq!(
            got.len(),
            case.answers.len(),
            "{what}: {:?}",
            got.iter().map(|g| show(g)).collect::<Vec<_>>()
        );
        for (g, want) in got.iter().zip(case.answers) {
            let text = payload(case.protocol, g);
            assert!(pattern_matches(want, &text), "{what}: {text:?} vs {want:?}");
        }
        assert!(buf.is_empty(), "{what}: extra {:?}", show(&buf));
        if case.closes {
            conn.closed().unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        if let Some((p, k)) = case.counter {
            daemon.wait_metric(
                "mxpace_protocol_errors_total",
                &[("protocol", p), ("kind", k)],
                before + 1.0,
            );
        }
        assert_serving(&daemon, Via::Tcp);
    }
    // Something that is no protocol at all: closed without an answer, and counted.
    let mut conn = daemon.connect(Via::Unix);
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    conn.closed().unwrap();
    daemon.wait_metric(
        "mxpace_protocol_errors_total",
        &[("protocol", "unknown"), ("kind", "unrecognised_protocol")],
        1.0,
    );
    assert_serving(&daemon, Via::Unix);
    // Every bad request left a warning in the log.
    assert!(daemon
        .log_text()
        .contains("bad request answered with an error reply"));
    daemon.stop();
}

/// A client that starts a request and then sends it a byte at a time is cut off by
/// `request_timeout`, also after earlier requests on the same connection.
#[test]
fn slow_client_is_cut_off_by_request_timeout() {
    // idle_timeout is longer than the whole test: only request_timeout can close these.
    let daemon = Daemon::start(Opts {
        config: Some(LIMITS_CONFIG.replace("\"30s\"", "\"60s\"")),
        ..Opts::default()
    });
    let cases: [(Protocol, &[u8]); 3] = [
        (
            Protocol::Policy,
            b"request=smtpd_access_policy\nrecipient=slow@example.com\n",
        ),
        (Protocol::Socketmap, b"999:transport slow@example.com"),
        (
            Protocol::JsonLines,
            b"{\"request\":\"smtpd_access_policy\",\"recipient\":",
        ),
    ];
    for (protocol, partial) in cases {
        for first_request_done in [false, true] {
            let what = format!("{protocol:?} after a request: {first_request_done}");
            // Cut off before its first bytes revealed a protocol, a connection counts
            // under protocol="unknown".
            let label: &[(&str, &str)] = if first_request_done {
                &[("protocol", protocol.as_str()), ("kind", "request_timeout")]
            } else {
                &[("kind", "request_timeout")]
            };
            let before =
                metric(&daemon.scrape(), "mxpace_protocol_errors_total", label).unwrap_or(0.0);
            let mut conn = daemon.connect(Via::Tcp);
            if first_request_done {
                let (req, want) = good_request(protocol, 0);
                assert!(conn.ask(protocol, &req).contains(want), "{what}");
            }
            // One byte every 50 ms: never idle, never done.
            conn.set_read_timeout(Duration::from_millis(50));
            let started = Instant::now();
            let mut cut_off = false;
            let mut trickle = partial.iter().cycle();
            while started.elapsed() < Duration::from_secs(20) {
                if conn.write_all(&[*trickle.next().unwrap()]).is_err() {
                    cut_off = true;
                    break;
                }
                let mut b = [0u8; 64];
                match conn.read(&mut b) {
                    Ok(0) => {
                        cut_off = true;
                        break;
                    }
                    Ok(n) => panic!("{what}: unexpected answer {:?}", show(&b[..n])),
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                        cut_off = true;
                        break;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            assert!(cut_off, "{what}: a trickling client was never cut off");
            daemon.wait_metric("mxpace_protocol_errors_total", label, before + 1.0);
        }
    }
    assert_serving(&daemon, Via::Tcp);
    daemon.stop();
}

/// A client that sends requests but never reads the answers is closed once a write
/// has been stuck for `request_timeout`, instead of holding its connection forever.
#[test]
fn client_that_never_reads_is_closed() {
    let daemon = Daemon::start(Opts {
        config: Some(LIMITS_CONFIG.into()),
        unix: true,
        ..Opts::default()
    });
    // Unix socket buffers are small: a few thousand unread answers fill them.
    let mut conn = UnixStream::connect(daemon.unix()).unwrap();
    conn.set_write_timeout(Some(PATIENCE)).unwrap();
    let batch = b"request=destination_query\nrecipient=a@gmail.com\n\n".repeat(1000);
    let mut outcome = None;
    for _ in 0..1000 {
        if let Err(e) = conn.write_all(&batch) {
            outcome = Some(e.kind());
            break;
        }
    }
    assert!(
        matches!(
            outcome,
            Some(ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
        ),
        "the daemon kept the connection: {outcome:?}"
    );
    daemon.wait_metric(
        "mxpace_protocol_errors_total",
        &[("protocol", "policy"), ("kind", "write_timeout")],
        1.0,
    );
    assert_serving(&daemon, Via::Unix);
    daemon.stop();
}

#[test]
fn idle_connections_are_closed() {
    let daemon = Daemon::start(Opts {
        config: Some("[server]\nidle_timeout = \"500ms\"\nrequest_timeout = \"5s\"\n".into()),
        unix: true,
        ..Opts::default()
    });
    for protocol in PROTOCOLS {
        let mut conn = daemon.connect(Via::Unix);
        let (req, want) = good_request(protocol, 0);
        assert!(conn.ask(protocol, &req).contains(want));
        // Nothing more is sent: the daemon closes the connection, cleanly.
        conn.closed().unwrap();
        daemon.wait_metric(
            "mxpace_protocol_errors_total",
            &[("protocol", protocol.as_str()), ("kind", "idle_timeout")],
            1.0,
        );
    }
    // A connection that never says anything is closed too, and counted.
    let mut conn = daemon.connect(Via::Tcp);
    conn.closed().unwrap();
    daemon.wait_metric(
        "mxpace_protocol_errors_total",
        &[("protocol", "unknown"), ("kind", "idle_timeout")],
        1.0,
    );
    assert_serving(&daemon, Via::Tcp);
    daemon.stop();
}

/// With `max_connections = 2`, a third connection waits until one of the first two
/// closes, and is then served.
#[test]
fn connection_cap_makes_extra_connections_wait() {
    let daemon = Daemon::start(Opts {
        config: Some("[server]\nmax_connections = 2\n".into()),
        ..Opts::default()
    });
    let mut a = daemon.connect(Via::Tcp);
    let mut b = daemon.connect(Via::Tcp);
    for c in [&mut a, &mut b] {
        let (req, want) = good_request(Protocol::Policy, 0);
        assert!(c.ask(Protocol::Policy, &req).contains(want));
    }
    let mut c = daemon.connect(Via::Tcp);
    let (req, want) = good_request(Protocol::Policy, 3);
    c.write_all(&req).unwrap();
    // Not answered while both permits are taken (the cap holds, it does not refuse).
    c.set_read_timeout(Duration::from_millis(300));
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("third connection served beyond the cap: {other:?}"),
    }
    daemon.wait_metric("mxpace_connection_limit_waits_total", &[], 1.0);
    drop(a);
    c.set_read_timeout(PATIENCE);
    let mut buf = Vec::new();
    let got = c.responses(Protocol::Policy, 1, &mut buf);
    assert_eq!(got, vec![want.as_bytes().to_vec()]);
    // The survivors keep working.
    let (req, want) = good_request(Protocol::Policy, 4);
    assert!(b.ask(Protocol::Policy, &req).contains(want));
    drop(b);
    drop(c);
    daemon.stop();
}

// ---------------------------------------------------------------------------------
// Config listeners, reload, shutdown.

#[test]
fn configured_listeners_fix_protocol_and_socket_mode() {
    let dir = TempDir::new("l");
    let sock = dir.path("sm.sock");
    let config = format!(
        "[[server.listeners]]\naddress = \"127.0.0.1:0\"\nprotocol = \"policy\"\n\n\
         [[server.listeners]]\naddress = \"unix:{}\"\nprotocol = \"socketmap\"\nmode = \"0600\"\n",
        sock.display()
    );
    let daemon = Daemon::start(Opts {
        config: Some(config),
        configured_listeners: true,
        ..Opts::default()
    });
    assert_eq!(daemon.unix(), sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (req, want) = good_request(Protocol::Policy, 0);
    assert_eq!(daemon.connect(Via::Tcp).ask(Protocol::Policy, &req), want);
    let (req, _) = good_request(Protocol::Socketmap, 0);
    assert_eq!(
        daemon.connect(Via::Unix).ask(Protocol::Socketmap, &req),
        "9:NOTFOUND ,"
    );
    // A fixed-protocol listener does not guess: JSON on the policy port is a bad policy line.
    let mut conn = daemon.connect(Via::Tcp);
    let got = conn.ask(
        Protocol::Policy,
        b"{\"request\":\"smtpd_access_policy\"}\n\n",
    );
    assert_eq!(got, "action=DUNNO\n\n");
    daemon.wait_metric(
        "mxpace_protocol_errors_total",
        &[("protocol", "policy"), ("kind", "malformed")],
        1.0,
    );
    daemon.stop();
    // The socket file is removed on shutdown.
    assert!(!sock.exists());
}

fn destination(daemon: &Daemon, rcpt: &str) -> String {
    daemon.connect(Via::Tcp).ask(
        Protocol::Policy,
        format!("request=destination_query\nrecipient={rcpt}\n\n").as_bytes(),
    )
}

#[test]
fn sighup_reloads_a_valid_config_and_refuses_an_invalid_one() {
    let daemon = Daemon::start(Opts {
        config: Some("[providers.gmail]\nstart_tier = \"t7\"\n".into()),
        ..Opts::default()
    });
    let config_path = daemon.dir.path("mxpace.toml");
    let before = destination(&daemon, "a@gmail.com");
    assert!(before.contains("\nrate=20\n"), "{before}");
    assert!(before.contains("\nconcurrency=10\n"), "{before}");
    // A 1000-byte line is within the default max_line_bytes (4096).
    let long_line = format!(
        "request=smtpd_access_policy\nx_long={}\nrecipient=a@b.test\n\n",
        "x".repeat(1000)
    );
    let line_too_long = [("protocol", "policy"), ("kind", "line_too_long")];
    daemon
        .connect(Via::Tcp)
        .ask(Protocol::Policy, long_line.as_bytes());
    assert_eq!(
        metric(
            &daemon.scrape(),
            "mxpace_protocol_errors_total",
            &line_too_long
        ),
        None
    );
    // A connection opened before the reload keeps the limits it started with.
    let mut old_conn = daemon.connect(Via::Tcp);
    old_conn.ask(Protocol::Policy, &good_request(Protocol::Policy, 0).0);

    std::fs::write(
        &config_path,
        "[server]\nmax_line_bytes = 512\nmax_connections = 10\n\n[providers.gmail]\nstart_tier = \"t3\"\n",
    )
    .unwrap();
    daemon.signal("HUP");
    daemon.wait_metric("mxpace_config_reloads_total", &[("result", "ok")], 1.0);
    let after = destination(&daemon, "b@gmail.com");
    assert!(after.contains("\nrate=3\n"), "{after}");
    assert!(after.contains("\nconcurrency=3\n"), "{after}");
    // New connections get the new limits; what cannot change without a restart is named.
    daemon
        .connect(Via::Tcp)
        .ask(Protocol::Policy, long_line.as_bytes());
    daemon.wait_metric("mxpace_protocol_errors_total", &line_too_long, 1.0);
    old_conn.ask(Protocol::Policy, long_line.as_bytes());
    daemon.wait_log("server.max_connections");
    assert_eq!(
        metric(
            &daemon.scrape(),
            "mxpace_protocol_errors_total",
            &line_too_long
        ),
        Some(1.0)
    );

    // Invalid: refused, logged, and the previous config keeps serving.
    std::fs::write(&config_path, "[providers.gmail]\nstart_tier = \"t99\"\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_metric("mxpace_config_reloads_total", &[("result", "error")], 1.0);
    daemon.wait_log("config reload refused");
    assert!(daemon.log_text().contains("t99"));
    let kept = destination(&daemon, "c@gmail.com");
    assert!(kept.contains("\nrate=3\n"), "{kept}");
    // Unparsable TOML: the same.
    std::fs::write(&config_path, "[providers.gmail\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_metric("mxpace_config_reloads_total", &[("result", "error")], 2.0);
    assert!(destination(&daemon, "d@gmail.com").contains("\nrate=3\n"));
    assert_serving(&daemon, Via::Tcp);
    daemon.stop();
}

/// SIGTERM while clients are busy: every request a client had sent in one burst is
/// answered (all of it or, when the burst came after the daemon stopped reading,
/// none of it), connections end cleanly, and the exit status is 0.
#[test]
fn sigterm_answers_requests_in_flight_and_exits_zero() {
    let daemon = Daemon::start(Opts {
        unix: true,
        ..Opts::default()
    });
    const CLIENTS: usize = 24;
    const BURST: usize = 20;
    let answered = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(Barrier::new(CLIENTS + 1));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let via = if c % 2 == 0 { Via::Tcp } else { Via::Unix };
            let protocol = PROTOCOLS[c % 3];
            let mut conn = daemon.connect(via);
            let answered = answered.clone();
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                let mut bursts = 0usize;
                loop {
                    let mut batch = Vec::new();
                    for i in 0..BURST {
                        batch.extend(good_request(protocol, bursts * BURST + i).0);
                    }
                    if conn.write_all(&batch).is_err() {
                        return bursts;
                    }
                    let mut buf = Vec::new();
                    let got = conn.responses(protocol, BURST, &mut buf);
                    let want = good_request(protocol, 0).1;
                    for g in &got {
                        assert!(String::from_utf8_lossy(g).contains(want));
                    }
                    assert!(buf.is_empty(), "partial answer {:?}", show(&buf));
                    answered.fetch_add(got.len(), Ordering::Relaxed);
                    match got.len() {
                        BURST => bursts += 1,
                        0 => return bursts,
                        n => panic!("{protocol:?} {via:?}: burst cut after {n} of {BURST} answers"),
                    }
                }
            })
        })
        .collect();
    go.wait();
    // Let traffic flow, then stop in the middle of it.
    let deadline = Instant::now() + PATIENCE;
    while answered.load(Ordering::Relaxed) < CLIENTS * BURST * 5 {
        assert!(Instant::now() < deadline, "no traffic");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut daemon = daemon;
    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
    for t in threads {
        assert!(t.join().unwrap() >= 1);
    }
    let log = daemon.log_text();
    assert!(
        log.contains("signal=\"SIGTERM\"") || log.contains("SIGTERM"),
        "{log}"
    );
    assert!(log.contains("stopped"), "{log}");
}

/// Scripts send signals as soon as the `listening on` lines appear.
#[test]
fn signals_right_after_startup_are_handled() {
    for _ in 0..3 {
        let mut daemon = Daemon::start(Opts::default());
        let status = daemon.terminate();
        assert!(status.success(), "{status}:\n{}", daemon.log_text());
    }
    let daemon = Daemon::start(Opts::default());
    daemon.signal("HUP");
    daemon.wait_metric("mxpace_config_reloads_total", &[("result", "ok")], 1.0);
    assert_serving(&daemon, Via::Tcp);
    daemon.stop();
}

// ---------------------------------------------------------------------------------
// check-config and logging.

#[test]
fn check_config_accepts_the_shipped_file_and_names_problems() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mxpace.toml");
    let out = Command::new(BIN)
        .args(["check-config", shipped])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let dir = TempDir::new("c");
    // (file text, what the message must name besides the file)
    let cases: &[(&str, &[&str])] = &[
        (
            "[server]\nmax_connections = 10\nidle_timeout = \"5 parsecs\"\n",
            &["line 3", "idle_timeout", "parsecs"],
        ),
        (
            "\n[server]\nmax_connections = \"many\"\n",
            &["line 3", "max_connections"],
        ),
        ("[server]\n\nbogus_field = 1\n", &["line 3", "bogus_field"]),
        (
            "[[server.listeners]]\naddress = \"127.0.0.1:1\"\nprotocol = \"smtp\"\n",
            &["line 3", "protocol", "smtp"],
        ),
        ("[server\n", &["line 1"]),
        (
            "[providers.gmail]\nstart_tier = \"t99\"\n",
            &["providers.gmail.start_tier", "t99"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path(&format!("broken{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let msg = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text:?}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{text:?}: {msg}");
        for n in *needles {
            assert!(msg.contains(n), "{text:?}: {n:?} not in {msg}");
        }
    }
    // serve refuses the same file with the same exit status, before binding anything.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path("broken0.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parsecs"));
}

#[test]
fn log_json_gives_json_lines() {
    let daemon = Daemon::start(Opts {
        log_json: true,
        ..Opts::default()
    });
    // A warning from a bad request, to see fields as well as messages.
    let mut conn = daemon.connect(Via::Tcp);
    conn.ask(Protocol::Socketmap, b"9:nomap key,");
    daemon.wait_log("unknown request type");
    daemon.stop_keep_log(|log| {
        let mut listening = 0;
        for line in log.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v.get("level").is_some() && v.get("timestamp").is_some(),
                "{line}"
            );
            let msg = v["message"].as_str().unwrap_or_default();
            if msg.starts_with("listening on 127.0.0.1:") {
                listening += 1;
            }
        }
        assert_eq!(listening, 1, "{log}");
        assert!(log.contains("\"protocol\":\"socketmap\""), "{log}");
    });
}

impl Daemon {
    /// Stops the daemon (asserting exit 0) and hands its whole log to `check`.
    fn stop_keep_log(mut self, check: impl FnOnce(&str)) {
        let status = self.terminate();
        assert!(status.success(), "{status}");
        check(&self.log_text());
    }
}
