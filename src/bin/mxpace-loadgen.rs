//! `mxpace-loadgen`: drives a running policy/socketmap/JSON-lines server with realistic
//! traffic and prints throughput, latency percentiles and the server's RSS.
//!
//! Closed loop: each of N connections keeps D requests in flight (D = 1: one request,
//! wait for its answer, send the next, as Postfix does; D > 1: pipelined) for the
//! duration. Requests are generated once before the run (recipients spread over
//! `--domains` domains, replies drawn from the shared reply data) so that the client
//! spends its time on I/O, not on formatting. The same binary drives the reference
//! servers (postfwd, a do-nothing baseline) with the same bytes, which is what makes
//! the figures comparable.

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Proto {
    /// Postfix policy delegation, `request=smtpd_access_policy` (31 attributes, as Postfix 3.7 sends).
    Policy,
    /// Policy protocol, `request=delivery_report` (classify + shape).
    Report,
    /// socketmap `status` (`smtp_delivery_status_filter` keys).
    Status,
    /// socketmap `transport` (`transport_maps` lookups of recipients).
    Transport,
    /// JSON lines, `delivery_report`.
    JsonlReport,
    /// JSON lines, `smtpd_access_policy`.
    JsonlPolicy,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Policy => "policy",
            Proto::Report => "report",
            Proto::Status => "status",
            Proto::Transport => "transport",
            Proto::JsonlReport => "jsonl-report",
            Proto::JsonlPolicy => "jsonl-policy",
        }
    }

    fn framing(self) -> Framing {
        match self {
            Proto::Policy | Proto::Report => Framing::BlankLine,
            Proto::Status | Proto::Transport => Framing::Netstring,
            Proto::JsonlReport | Proto::JsonlPolicy => Framing::Line,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "mxpace-loadgen",
    about = "Closed-loop load generator for mxpace and other policy servers"
)]
struct Args {
    /// Server address: `HOST:PORT` or `unix:/path`.
    #[arg(long, default_value = "127.0.0.1:10027")]
    target: String,
    /// Request type and protocol.
    #[arg(long, value_enum, default_value = "policy")]
    protocol: Proto,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection (1 = not pipelined).
    #[arg(long, short = 'd', default_value_t = 1)]
    depth: usize,
    /// Measured time, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up before the measured time, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Recipient domains the traffic is spread over.
    #[arg(long, default_value_t = 1000)]
    domains: usize,
    /// Local parts per domain.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Share of delivery reports that are successful deliveries (`250 2.0.0 Ok: queued`);
    /// the rest are replies drawn from the reply data.
    #[arg(long, default_value_t = 0.7)]
    delivered: f64,
    /// Directory with `seed-replies.tsv` and `corpus/dev.tsv`.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"))]
    data: PathBuf,
    /// Distinct pre-generated requests, cycled through.
    #[arg(long, default_value_t = 16384)]
    requests: usize,
    /// Client worker threads (1 = a single-threaded client).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds without an answer after which a connection gives up (a server that does
    /// not pipeline may never answer a second queued request).
    #[arg(long, default_value_t = 10.0)]
    stall: f64,
    /// PID of the server, to report its RSS (VmRSS, VmHWM) after the run.
    #[arg(long)]
    pid: Option<u32>,
    /// Seed of the traffic generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object with the results instead of text.
    #[arg(long)]
    json: bool,
    /// A label copied into the output (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
}

/// xorshift64*: reproducible traffic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Reply texts: first column of the seed replies and of the corpus.
fn load_replies(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let seed = std::fs::read_to_string(dir.join("seed-replies.tsv"))?;
    out.extend(
        seed.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split('\t').next())
            .map(str::to_string),
    );
    let corpus = std::fs::read_to_string(dir.join("corpus/dev.tsv"))?;
    out.extend(
        corpus
            .lines()
            .skip(1)
            .filter_map(|l| l.split('\t').next())
            .filter(|r| !r.is_empty())
            .map(str::to_string),
    );
    // The wire protocols carry one line; joined multi-line replies keep their codes.
    for r in &mut out {
        *r = r.replace(['\r', '\n'], " ");
    }
    Ok(out)
}

/// The enhanced status code a reply carries (`4.7.28`), if any.
fn status_of(reply: &str) -> Option<&str> {
    reply.split_whitespace().take(3).find_map(|w| {
        // `421-4.7.28` opens a multi-line reply.
        let w = match w.as_bytes() {
            [a, b, c, b'-', ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => &w[4..],
            _ => w,
        };
        let p: Vec<&str> = w.split('.').collect();
        (p.len() == 3
            && matches!(p[0], "2" | "4" | "5")
            && p.iter()
                .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit())))
        .then_some(w)
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serialises")
}

struct Traffic {
    domains: usize,
    users: usize,
    delivered: f64,
    replies: Vec<String>,
}

impl Traffic {
    fn recipient(&self, rng: &mut Rng) -> String {
        format!(
            "u{}@d{}.example.com",
            rng.below(self.users),
            rng.below(self.domains)
        )
    }

    fn reply(&self, rng: &mut Rng) -> (String, String) {
        if self.replies.is_empty() || rng.chance(self.delivered) {
            let id = rng.next() & 0xF_FFFF_FFFF;
            return (format!("250 2.0.0 Ok: queued as {id:X}"), "2.0.0".into());
        }
        let r = self.replies[rng.below(self.replies.len())].clone();
        let status = status_of(&r).unwrap_or("").to_string();
        (r, status)
    }

    fn request(&self, proto: Proto, rng: &mut Rng) -> Vec<u8> {
        let rcpt = self.recipient(rng);
        let source_ip = format!("192.0.2.{}", 10 + rng.below(4));
        let domain = rcpt.split('@').nth(1).unwrap_or("");
        let mx = format!("mx{}.{domain}", rng.below(2));
        let mx_ip = format!("198.51.100.{}", rng.below(250) + 1);
        match proto {
            Proto::Policy => format!(
                "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
                 helo_name=client.example.net\nqueue_id=\nsender=alice@sender.example.org\n\
                 recipient={rcpt}\nrecipient_count=0\nclient_address=192.0.2.77\n\
                 client_name=client.example.net\nreverse_client_name=client.example.net\n\
                 instance=1a2b.5f3c1d2e.9a8b7.0\nsasl_method=\nsasl_username=\nsasl_sender=\n\
                 size=12345\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n\
                 ccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n\
                 encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\n\
                 etrn_domain=\nstress=\nserver_address=192.0.2.1\nserver_port=25\n\
                 client_port={}\npolicy_context=\ncompatibility_level=3.6\n\
                 mail_version=3.7.11\n\n",
                1024 + rng.below(60000)
            )
            .into_bytes(),
            Proto::Report => {
                let (reply, status) = self.reply(rng);
                format!(
                    "request=delivery_report\nrecipient={rcpt}\nsender=bounces@sender.example.org\n\
                     mx_host={mx}\nmx_ip={mx_ip}\nsource_ip={source_ip}\nstatus={status}\n\
                     reply={reply}\n\n"
                )
                .into_bytes()
            }
            Proto::Status => {
                let (reply, status) = self.reply(rng);
                let key = if status.starts_with('2') {
                    format!("{status} {reply}")
                } else {
                    let status = if status.is_empty() { "4.0.0" } else { &status };
                    format!("{status} host {mx}[{mx_ip}] said: {reply} (in reply to RCPT TO command)")
                };
                netstring(&format!("status {key}"))
            }
            Proto::Transport => netstring(&format!("transport {rcpt}")),
            Proto::JsonlReport => {
                let (reply, status) = self.reply(rng);
                format!(
                    "{{\"request\":\"delivery_report\",\"recipient\":{},\"sender\":\"bounces@sender.example.org\",\
                     \"mx_host\":{},\"mx_ip\":{},\"source_ip\":{},\"status\":{},\"reply\":{}}}\n",
                    json_str(&rcpt),
                    json_str(&mx),
                    json_str(&mx_ip),
                    json_str(&source_ip),
                    json_str(&status),
                    json_str(&reply)
                )
                .into_bytes()
            }
            Proto::JsonlPolicy => format!(
                "{{\"request\":\"smtpd_access_policy\",\"sender\":\"alice@sender.example.org\",\"recipient\":{}}}\n",
                json_str(&rcpt)
            )
            .into_bytes(),
        }
    }
}

fn netstring(payload: &str) -> Vec<u8> {
    format!("{}:{payload},", payload.len()).into_bytes()
}

#[derive(Copy, Clone)]
enum Framing {
    /// Policy answers: attribute lines ended by an empty line.
    BlankLine,
    Netstring,
    /// JSON lines.
    Line,
}

/// Length of the first complete answer in `buf`, if there is one.
fn answer_len(framing: Framing, buf: &[u8]) -> Result<Option<usize>, String> {
    match framing {
        Framing::Line => Ok(memchr::memchr(b'\n', buf).map(|i| i + 1)),
        Framing::BlankLine => Ok(memchr::memmem::find(buf, b"\n\n").map(|i| i + 2)),
        Framing::Netstring => {
            let Some(colon) = memchr::memchr(b':', &buf[..buf.len().min(11)]) else {
                return if buf.len() > 10 {
                    Err("bad netstring length".into())
                } else {
                    Ok(None)
                };
            };
            let len: usize = std::str::from_utf8(&buf[..colon])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad netstring length")?;
            let total = colon + 1 + len + 1;
            Ok((buf.len() >= total).then_some(total))
        }
    }
}

/// The answer's action, for the tally: `action=X` / `OK X` / `"action":"X"`, first word.
fn answer_kind(framing: Framing, answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    let word = |s: &str| {
        s.split([' ', '\n', ',', '"'])
            .next()
            .unwrap_or("")
            .to_string()
    };
    match framing {
        Framing::BlankLine => word(text.strip_prefix("action=").unwrap_or(&text)),
        Framing::Netstring => {
            let payload = text.split_once(':').map(|x| x.1).unwrap_or(&text);
            word(payload)
        }
        Framing::Line => text
            .split_once("\"action\":\"")
            .map(|x| word(x.1))
            .unwrap_or_else(|| word(&text)),
    }
}

struct ConnResult {
    hist: Histogram<u64>,
    completed: u64,
    kinds: HashMap<String, u64>,
    error: Option<String>,
}

struct Plan {
    requests: Vec<Vec<u8>>,
    framing: Framing,
    depth: usize,
    measure_from: Instant,
    end: Instant,
    /// Longest wait for an answer before the connection counts as failed.
    stall: Duration,
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    plan: Arc<Plan>,
    start_at: usize,
) -> ConnResult {
    let mut r = ConnResult {
        hist: Histogram::new_with_bounds(100, 60_000_000_000, 3).expect("histogram bounds"),
        completed: 0,
        kinds: HashMap::new(),
        error: None,
    };
    let n = plan.requests.len();
    let mut next = start_at % n;
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(plan.depth);
    let mut out: Vec<u8> = Vec::with_capacity(plan.depth * 1024);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut answers: u64 = 0;
    let mut want = plan.depth;
    loop {
        // Top the pipeline up to its depth with one write.
        let now = Instant::now();
        if now < plan.end {
            out.clear();
            while want > 0 {
                out.extend_from_slice(&plan.requests[next]);
                next = (next + 1) % n;
                sent_at.push_back(now);
                want -= 1;
            }
            if !out.is_empty() {
                if let Err(e) = io.write_all(&out).await {
                    r.error = Some(format!("write: {e}"));
                    return r;
                }
            }
        }
        if sent_at.is_empty() {
            break;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        let read = tokio::time::timeout(plan.stall, io.read_buf(&mut buf)).await;
        let Ok(read) = read else {
            r.error = Some(format!(
                "no answer for {:?} with {} request(s) pending (does the server pipeline?)",
                plan.stall,
                sent_at.len()
            ));
            return r;
        };
        match read {
            Ok(0) => {
                r.error = Some(format!(
                    "server closed the connection with {} answers pending",
                    sent_at.len()
                ));
                return r;
            }
            Ok(_) => {}
            Err(e) => {
                r.error = Some(format!("read: {e}"));
                return r;
            }
        }
        let got = Instant::now();
        let mut pos = 0;
        loop {
            match answer_len(plan.framing, &buf[pos..]) {
                Ok(Some(len)) => {
                    let Some(sent) = sent_at.pop_front() else {
                        r.error = Some("answer without a request".into());
                        return r;
                    };
                    if sent >= plan.measure_from && got <= plan.end {
                        let ns = got.duration_since(sent).as_nanos() as u64;
                        r.hist.saturating_record(ns.max(100));
                        r.completed += 1;
                    }
                    // Sample answers for the tally (every answer would cost a hash per request).
                    if answers % 64 == 0 {
                        *r.kinds
                            .entry(answer_kind(plan.framing, &buf[pos..pos + len]))
                            .or_default() += 1;
                    }
                    answers += 1;
                    want += 1;
                    pos += len;
                }
                Ok(None) => break,
                Err(e) => {
                    r.error = Some(e);
                    return r;
                }
            }
        }
        buf.drain(..pos);
    }
    r
}

async fn connect_and_drive(target: String, plan: Arc<Plan>, start_at: usize) -> ConnResult {
    let fail = |e: String| ConnResult {
        hist: Histogram::new(3).expect("histogram"),
        completed: 0,
        kinds: HashMap::new(),
        error: Some(e),
    };
    if let Some(path) = target.strip_prefix("unix:") {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => drive(s, plan, start_at).await,
            Err(e) => fail(format!("connect {target}: {e}")),
        }
    } else {
        match tokio::net::TcpStream::connect(&target).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                drive(s, plan, start_at).await
            }
            Err(e) => fail(format!("connect {target}: {e}")),
        }
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn rss_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let replies = if matches!(
        a.protocol,
        Proto::Report | Proto::Status | Proto::JsonlReport
    ) {
        match load_replies(&a.data) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mxpace-loadgen: reading {}: {e}", a.data.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        Vec::new()
    };
    let traffic = Traffic {
        domains: a.domains.max(1),
        users: a.users.max(1),
        delivered: a.delivered,
        replies,
    };
    let mut rng = Rng(a.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let requests: Vec<Vec<u8>> = (0..a.requests.max(1))
        .map(|_| traffic.request(a.protocol, &mut rng))
        .collect();
    let mean_bytes = requests.iter().map(Vec::len).sum::<usize>() / requests.len();

    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = measure_from + Duration::from_secs_f64(a.duration.max(0.001));
    let plan = Arc::new(Plan {
        requests,
        framing: a.protocol.framing(),
        depth: a.depth.max(1),
        measure_from,
        end,
        stall: Duration::from_secs_f64(a.stall.max(0.1)),
    });
    let per_conn = plan.requests.len() / a.connections.max(1);
    let results: Vec<ConnResult> = rt.block_on(async {
        let tasks: Vec<_> = (0..a.connections.max(1))
            .map(|i| {
                tokio::spawn(connect_and_drive(
                    a.target.clone(),
                    plan.clone(),
                    i * per_conn.max(1),
                ))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("connection task"));
        }
        out
    });
    let measured = end.saturating_duration_since(measure_from).as_secs_f64();

    let mut hist = Histogram::<u64>::new_with_bounds(100, 60_000_000_000, 3).expect("histogram");
    let mut completed = 0u64;
    let mut kinds: HashMap<String, u64> = HashMap::new();
    let mut errors = Vec::new();
    for r in &results {
        hist.add(&r.hist).expect("histograms of the same bounds");
        completed += r.completed;
        for (k, v) in &r.kinds {
            *kinds.entry(k.clone()).or_default() += v;
        }
        if let Some(e) = &r.error {
            errors.push(e.clone());
        }
    }
    let rps = completed as f64 / measured;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let rss = a.pid.and_then(rss_of);
    let mut kinds: Vec<(String, u64)> = kinds.into_iter().collect();
    kinds.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let share: Vec<String> = {
        let total: u64 = kinds.iter().map(|k| k.1).sum::<u64>().max(1);
        kinds
            .iter()
            .take(6)
            .map(|(k, v)| format!("{k} {:.1}%", *v as f64 * 100.0 / total as f64))
            .collect()
    };

    if a.json {
        let v = serde_json::json!({
            "label": a.label,
            "target": a.target,
            "protocol": a.protocol.name(),
            "connections": a.connections,
            "depth": a.depth,
            "domains": a.domains,
            "duration_s": measured,
            "request_bytes": mean_bytes,
            "completed": completed,
            "rps": rps,
            "p50_us": us(0.5),
            "p99_us": us(0.99),
            "p999_us": us(0.999),
            "max_us": hist.max() as f64 / 1000.0,
            "rss_kib": rss.map(|r| r.0),
            "hwm_kib": rss.map(|r| r.1),
            "answers": share,
            "errors": errors,
        });
        println!("{v}");
    } else {
        println!(
            "{} {} -> {}: {} connection(s) × depth {}, {} domains, {:.1} s measured, {} B/request",
            a.label,
            a.protocol.name(),
            a.target,
            a.connections,
            a.depth,
            a.domains,
            measured,
            mean_bytes
        );
        println!("  throughput {rps:.0} req/s ({completed} answers)");
        println!(
            "  latency p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
            us(0.5),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1000.0
        );
        if let Some((rss, hwm)) = rss {
            println!("  server RSS {rss} KiB (peak {hwm} KiB)");
        }
        println!("  answers (sampled): {}", share.join(", "));
        for e in &errors {
            println!("  error: {e}");
        }
    }
    if errors.is_empty() && completed > 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_framing() {
        let cases: &[(Framing, &[u8], Option<usize>)] = &[
            (Framing::BlankLine, b"action=DUNNO\n\n", Some(14)),
            (Framing::BlankLine, b"action=DUNNO\n", None),
            (
                Framing::BlankLine,
                b"action=DEFER\nclass=x\n\naction",
                Some(22),
            ),
            (Framing::Netstring, b"9:NOTFOUND ,", Some(12)),
            (Framing::Netstring, b"9:NOTFOU", None),
            (Framing::Netstring, b"12", None),
            (Framing::Line, b"{\"action\":\"DUNNO\"}\n{", Some(19)),
            (Framing::Line, b"{\"action\"", None),
        ];
        for (framing, buf, want) in cases {
            assert_eq!(
                answer_len(*framing, buf).unwrap(),
                *want,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        assert!(answer_len(Framing::Netstring, b"x:abc").is_err());
    }

    #[test]
    fn answer_kinds() {
        assert_eq!(
            answer_kind(Framing::BlankLine, b"action=DUNNO\n\n"),
            "DUNNO"
        );
        assert_eq!(
            answer_kind(Framing::BlankLine, b"action=DEFER_IF_PERMIT 4.7.1 x\n\n"),
            "DEFER_IF_PERMIT"
        );
        assert_eq!(answer_kind(Framing::Netstring, b"9:NOTFOUND ,"), "NOTFOUND");
        assert_eq!(
            answer_kind(Framing::Line, b"{\"action\":\"retry\",\"class\":\"x\"}\n"),
            "retry"
        );
    }

    #[test]
    fn generated_requests_are_well_formed() {
        let t = Traffic {
            domains: 10,
            users: 5,
            delivered: 0.5,
            replies: vec!["421 4.7.28 Gmail has detected an unusual rate".into()],
        };
        let mut rng = Rng(7);
        for _ in 0..50 {
            let p = t.request(Proto::Policy, &mut rng);
            assert!(p.ends_with(b"\n\n") && p.starts_with(b"request=smtpd_access_policy\n"));
            assert_eq!(
                p.iter().filter(|&&b| b == b'\n').count(),
                32,
                "31 attributes"
            );
            let r = String::from_utf8(t.request(Proto::Report, &mut rng)).unwrap();
            assert!(r.contains("\nrecipient=u") && r.ends_with("\n\n"));
            assert!(r.contains("status=4.7.28\n") || r.contains("status=2.0.0\n"));
            let s = t.request(Proto::Status, &mut rng);
            assert_eq!(answer_len(Framing::Netstring, &s).unwrap(), Some(s.len()));
            let j = t.request(Proto::JsonlReport, &mut rng);
            let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
            assert_eq!(v["request"], "delivery_report");
        }
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 <a@b>: no"), Some("5.1.1"));
        assert_eq!(status_of("421-4.7.28 Gmail"), Some("4.7.28"));
        assert_eq!(status_of("554 rejected"), None);
    }
}
