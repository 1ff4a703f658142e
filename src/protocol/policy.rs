//! Postfix policy delegation: `name=value` lines, a blank line ends a request.
//!
//! A decoded [`PolicyRequest`] is the request's bytes plus the positions of its
//! attributes (no `String` per attribute). Bad requests are resynchronised: once a
//! line breaks a limit, the rest of that request is discarded up to its blank line
//! (never buffered), and the request yields one [`PolicyError`] item, answered with
//! `action=DUNNO` like any other. This is always safe because a blank line cannot
//! occur inside a line; a client that never sends one is bounded by the server's
//! idle and slow-client timeouts, not by memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use smallvec::SmallVec;
use std::fmt::Write as _;
use std::io;
use tokio_util::codec::{Decoder, Encoder};

use super::{utf8, Answer, Kind, Query, Reply, DUNNO};

/// Bounds on one request; every one of them yields an error answer, not a closed connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest `name=value` line in bytes, without its newline. 4 KiB rather than
    /// Postfix's usual few hundred bytes: a `reply=` carries a joined multi-line reply.
    pub max_line: usize,
    /// Attributes per request; Postfix 3.7 sends about 30.
    pub max_attributes: usize,
    /// Bytes per request including newlines; capped at [`MAX_REQUEST_CAP`].
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line: 4096,
            max_attributes: 64,
            max_request: 16 * 1024,
        }
    }
}

/// Why a policy request was refused. All but `Truncated` leave the stream in sync.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("line too long")]
    LineTooLong,
    #[error("too many attributes")]
    TooManyAttributes,
    #[error("request too large")]
    RequestTooLarge,
    #[error("invalid UTF-8")]
    InvalidUtf8,
    #[error("malformed line (expected name=value)")]
    Malformed,
    #[error("empty request")]
    Empty,
    #[error("connection closed in the middle of a request")]
    Truncated,
}

impl PolicyError {
    /// Stable metric label.
    pub const fn kind(self) -> &'static str {
        match self {
            PolicyError::LineTooLong => "line_too_long",
            PolicyError::TooManyAttributes => "too_many_attributes",
            PolicyError::RequestTooLarge => "request_too_large",
            PolicyError::InvalidUtf8 => "invalid_utf8",
            PolicyError::Malformed => "malformed",
            PolicyError::Empty => "empty",
            PolicyError::Truncated => "truncated",
        }
    }

    /// Only a truncated request ends the stream (it is the end of the stream).
    pub const fn is_fatal(self) -> bool {
        matches!(self, PolicyError::Truncated)
    }

    /// Logged reason; the wire answer is always `action=DUNNO`.
    pub const fn reason(self) -> &'static str {
        match self {
            PolicyError::LineTooLong => "policy line too long",
            PolicyError::TooManyAttributes => "too many policy attributes",
            PolicyError::RequestTooLarge => "policy request too large",
            PolicyError::InvalidUtf8 => "invalid UTF-8 in policy request",
            PolicyError::Malformed => "malformed policy line (expected name=value)",
            PolicyError::Empty => "empty policy request",
            PolicyError::Truncated => "truncated policy request",
        }
    }
}

/// Positions of one `name=value` line inside the frame: name = `start..eq`,
/// value = `eq + 1..end`. `u16` keeps the inline array small; requests are capped
/// below 64 KiB for it ([`MAX_REQUEST_CAP`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Attr {
    start: u16,
    eq: u16,
    end: u16,
}

/// Upper bound for [`Limits::max_request`]: attribute positions are `u16`.
pub const MAX_REQUEST_CAP: usize = u16::MAX as usize;

/// Inline room for Postfix's ~30 attributes; a rare larger request spills to the heap.
type Attrs = SmallVec<[Attr; 32]>;

/// One policy request: its bytes (attribute lines and the blank line) and where each
/// attribute lies in them. Every line was checked to be UTF-8.
#[derive(Clone, Debug)]
pub struct PolicyRequest {
    frame: Bytes,
    attrs: Attrs,
}

impl PolicyRequest {
    /// Value of the first attribute called `name`; unknown attributes are kept and
    /// can be read here, but nothing else looks at them.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| &self.frame[a.start as usize..a.eq as usize] == name.as_bytes())
            .map(|a| self.value(a))
    }

    /// The `request=` attribute.
    pub fn request_type(&self) -> Option<&str> {
        self.get("request")
    }

    /// Every attribute in order, unknown ones included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.attrs.iter().map(|a| {
            (
                utf8(&self.frame[a.start as usize..a.eq as usize]),
                self.value(a),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.attrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }

    /// The raw request, attribute lines and blank line included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.frame
    }

    fn value(&self, a: &Attr) -> &str {
        utf8(&self.frame[a.eq as usize + 1..a.end as usize])
    }

    /// The protocol-neutral view: one pass over the attributes.
    pub fn query(&self) -> Query<'_> {
        let mut q = Query::default();
        for a in &self.attrs {
            let name = &self.frame[a.start as usize..a.eq as usize];
            let slot = match name {
                b"request" => &mut q.name,
                b"recipient" => q.recipient.insert(""),
                b"sender" => q.sender.insert(""),
                b"mx_host" => q.mx_host.insert(""),
                b"mx_ip" => q.mx_ip.insert(""),
                b"source_ip" => q.source_ip.insert(""),
                b"pool" => q.pool.insert(""),
                b"status" => q.status.insert(""),
                b"reply" => q.reply.insert(""),
                b"domain" => q.domain.insert(""),
                b"context" | b"policy_context" => q.context.insert(""),
                _ => continue,
            };
            *slot = self.value(a);
        }
        q.kind = Kind::from_request(q.name);
        // Postfix always sends `policy_context`, empty unless configured.
        q.context = q.context.filter(|c| !c.is_empty());
        q
    }
}

/// Decoder of [`PolicyRequest`]s and encoder of [`Answer`]s.
#[derive(Debug, Default)]
pub struct PolicyCodec {
    limits: Limits,
    /// Bytes of the current request already searched for a newline.
    scanned: usize,
    /// Start of the line being read.
    line_start: usize,
    attrs: Attrs,
    /// Set while discarding the rest of a bad request up to its blank line.
    failed: Option<PolicyError>,
    /// While discarding: part of a line was dropped, so the next newline ends that
    /// line rather than being a blank one.
    mid_line: bool,
}

impl PolicyCodec {
    pub fn new(limits: Limits) -> PolicyCodec {
        let limits = Limits {
            max_request: limits.max_request.min(MAX_REQUEST_CAP),
            ..limits
        };
        PolicyCodec {
            limits,
            ..PolicyCodec::default()
        }
    }

    fn reset(&mut self) {
        self.scanned = 0;
        self.line_start = 0;
        self.attrs.clear();
        self.failed = None;
        self.mid_line = false;
    }

    /// Enters discard mode: the request's complete lines are dropped now, the rest
    /// (starting with the current partial line) as it arrives.
    fn fail(&mut self, err: PolicyError, buf: &mut BytesMut) {
        buf.advance(self.line_start);
        self.scanned = 0;
        self.line_start = 0;
        self.attrs.clear();
        self.failed = Some(err);
        self.mid_line = false;
    }

    fn discard(&mut self, buf: &mut BytesMut) -> Option<Result<PolicyRequest, PolicyError>> {
        loop {
            let Some(i) = memchr::memchr(b'\n', buf) else {
                if !buf.is_empty() {
                    self.mid_line = true;
                    buf.clear();
                }
                return None;
            };
            let blank = !self.mid_line && (i == 0 || (i == 1 && buf[0] == b'\r'));
            buf.advance(i + 1);
            self.mid_line = false;
            if blank {
                let err = self.failed.take().unwrap_or(PolicyError::Malformed);
                self.reset();
                return Some(Err(err));
            }
        }
    }
}

impl Decoder for PolicyCodec {
    type Item = Result<PolicyRequest, PolicyError>;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        loop {
            if self.failed.is_some() {
                return Ok(self.discard(buf));
            }
            let Some(i) = memchr::memchr(b'\n', &buf[self.scanned..]) else {
                self.scanned = buf.len();
                if buf.len() - self.line_start > self.limits.max_line {
                    self.fail(PolicyError::LineTooLong, buf);
                    continue;
                }
                if buf.len() > self.limits.max_request {
                    self.fail(PolicyError::RequestTooLarge, buf);
                    continue;
                }
                // Room for the rest of a line is cheaper to grow once than per read.
                return Ok(None);
            };
            let nl = self.scanned + i;
            let start = self.line_start;
            self.scanned = nl + 1;
            self.line_start = nl + 1;
            let mut end = nl;
            if end > start && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end == start {
                let frame = buf.split_to(nl + 1).freeze();
                let attrs = std::mem::take(&mut self.attrs);
                self.reset();
                if attrs.is_empty() {
                    return Ok(Some(Err(PolicyError::Empty)));
                }
                return Ok(Some(Ok(PolicyRequest { frame, attrs })));
            }
            let line = &buf[start..end];
            let err = if line.len() > self.limits.max_line {
                Some(PolicyError::LineTooLong)
            } else if nl + 1 > self.limits.max_request {
                Some(PolicyError::RequestTooLarge)
            } else if self.attrs.len() >= self.limits.max_attributes {
                Some(PolicyError::TooManyAttributes)
            } else {
                match memchr::memchr(b'=', line) {
                    None | Some(0) => Some(PolicyError::Malformed),
                    // The ASCII check is inlined and word-wide; most lines need nothing more.
                    Some(_) if !line.is_ascii() && std::str::from_utf8(line).is_err() => {
                        Some(PolicyError::InvalidUtf8)
                    }
                    Some(eq) => {
                        self.attrs.push(Attr {
                            start: start as u16,
                            eq: (start + eq) as u16,
                            end: end as u16,
                        });
                        None
                    }
                }
            };
            if let Some(err) = err {
                self.fail(err, buf);
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        let pending = !buf.is_empty() || self.failed.is_some() || self.mid_line;
        buf.clear();
        self.reset();
        Ok(pending.then_some(Err(PolicyError::Truncated)))
    }
}

impl Encoder<&Answer<'_>> for PolicyCodec {
    type Error = io::Error;

    fn encode(&mut self, answer: &Answer<'_>, dst: &mut BytesMut) -> io::Result<()> {
        encode_answer(answer, dst);
        Ok(())
    }
}

/// Appends `action=…`, the limits that are set, and the blank line. Errors fail open
/// as `action=DUNNO` alone: Postfix reads nothing but `action`, and a policy server
/// that is unsure must not block mail.
pub fn encode_answer(answer: &Answer<'_>, dst: &mut BytesMut) {
    let action = match answer.reply {
        Reply::Action(a) => a,
        Reply::NotFound => DUNNO,
        Reply::Temp(_) | Reply::Perm(_) => {
            dst.put_slice(b"action=DUNNO\n\n");
            return;
        }
    };
    put_attr(dst, "action", action);
    if let Some(c) = answer.class {
        put_attr(dst, "class", c.as_str());
    }
    if let Some(p) = answer.provider {
        put_attr(dst, "provider", p);
    }
    if let Some(b) = answer.blamed {
        put_attr(dst, "blamed", b.as_str());
    }
    if let Some(s) = answer.stage {
        put_attr(dst, "stage", s);
    }
    // fmt::Write for BytesMut cannot fail.
    if let Some(r) = answer.retry_after {
        let _ = writeln!(dst, "retry_after={r}");
    }
    if let Some(c) = answer.concurrency {
        let _ = writeln!(dst, "concurrency={c}");
    }
    if let Some(r) = answer.rate.filter(|r| r.is_finite()) {
        dst.put_slice(b"rate=");
        put_rate(dst, r);
        dst.put_u8(b'\n');
    }
    dst.put_u8(b'\n');
}

/// A newline inside a value would end the response early, so it becomes a space.
fn put_attr(dst: &mut BytesMut, name: &str, value: &str) {
    dst.reserve(name.len() + value.len() + 2);
    dst.put_slice(name.as_bytes());
    dst.put_u8(b'=');
    if value.bytes().any(|b| b == b'\n' || b == b'\r') {
        dst.extend(
            value
                .bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    } else {
        dst.put_slice(value.as_bytes());
    }
    dst.put_u8(b'\n');
}

/// Messages per second with at most three decimals and no trailing zeros (`0.5`, `12`).
/// Integer arithmetic: float formatting with a precision takes a slow exact path.
fn put_rate(dst: &mut BytesMut, rate: f64) {
    // Rates are small; the clamp only keeps the cast defined.
    let milli = (rate.abs() * 1000.0).round().min(1e15) as u64;
    if rate < 0.0 && milli > 0 {
        dst.put_u8(b'-');
    }
    let _ = write!(dst, "{}", milli / 1000);
    let mut frac = milli % 1000;
    if frac > 0 {
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let _ = write!(dst, ".{frac:0digits$}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Blamed, Class};

    type Got = Vec<Result<Vec<(String, String)>, PolicyError>>;

    /// Decodes `input` fed in chunks of `chunk` bytes, then EOF.
    fn decode_chunked(limits: Limits, input: &[u8], chunk: usize) -> Got {
        let mut codec = PolicyCodec::new(limits);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut push = |item: Result<PolicyRequest, PolicyError>| {
            got.push(item.map(|r| {
                r.iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect()
            }));
        };
        for part in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(part);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                push(item);
            }
            // Bounded buffering: a request being discarded never accumulates.
            assert!(
                buf.len() <= limits.max_request.min(MAX_REQUEST_CAP) + chunk,
                "buffer grew to {}",
                buf.len()
            );
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            push(item);
        }
        got
    }

    fn ok(pairs: &[(&str, &str)]) -> Result<Vec<(String, String)>, PolicyError> {
        Ok(pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect())
    }

    #[test]
    fn decode_table() {
        let small = Limits {
            max_line: 16,
            max_attributes: 2,
            max_request: 40,
        };
        let long = format!("reply={}\n", "x".repeat(5000));
        let cases: Vec<(&str, Limits, Vec<u8>, Got)> = vec![
            (
                "one request",
                Limits::default(),
                b"request=smtpd_access_policy\nrecipient=a@b.test\n\n".to_vec(),
                vec![ok(&[
                    ("request", "smtpd_access_policy"),
                    ("recipient", "a@b.test"),
                ])],
            ),
            (
                "pipelined",
                Limits::default(),
                b"a=1\n\nb=2\nc=\n\n".to_vec(),
                vec![ok(&[("a", "1")]), ok(&[("b", "2"), ("c", "")])],
            ),
            (
                "value keeps = and spaces",
                Limits::default(),
                b"reply=550 5.1.1 a=b c\n\n".to_vec(),
                vec![ok(&[("reply", "550 5.1.1 a=b c")])],
            ),
            (
                "crlf tolerated",
                Limits::default(),
                b"a=1\r\n\r\nb=2\n\n".to_vec(),
                vec![ok(&[("a", "1")]), ok(&[("b", "2")])],
            ),
            (
                "utf-8 value",
                Limits::default(),
                "reply=Bo\u{ee}te pleine\n\n".as_bytes().to_vec(),
                vec![ok(&[("reply", "Bo\u{ee}te pleine")])],
            ),
            (
                "line too long, then resync",
                Limits::default(),
                [b"a=1\n".as_slice(), long.as_bytes(), b"b=2\n\nc=3\n\n"].concat(),
                vec![Err(PolicyError::LineTooLong), ok(&[("c", "3")])],
            ),
            (
                "line too long as the last line",
                small,
                b"a=1\nb=0123456789abcdefghij\n\nc=3\n\n".to_vec(),
                vec![Err(PolicyError::LineTooLong), ok(&[("c", "3")])],
            ),
            (
                "too many attributes",
                small,
                b"a=1\nb=2\nc=3\nd=4\n\ne=5\n\n".to_vec(),
                vec![Err(PolicyError::TooManyAttributes), ok(&[("e", "5")])],
            ),
            (
                "request too large",
                Limits {
                    max_attributes: 64,
                    ..small
                },
                b"a=0123456789\nb=0123456789\nc=0123456789\nd=1\n\ne=5\n\n".to_vec(),
                vec![Err(PolicyError::RequestTooLarge), ok(&[("e", "5")])],
            ),
            (
                "malformed line without =",
                Limits::default(),
                b"a=1\nhello\nb=2\n\nc=3\n\n".to_vec(),
                vec![Err(PolicyError::Malformed), ok(&[("c", "3")])],
            ),
            (
                "malformed line with empty name",
                Limits::default(),
                b"=1\n\n".to_vec(),
                vec![Err(PolicyError::Malformed)],
            ),
            (
                "invalid utf-8",
                Limits::default(),
                b"reply=\xff\xfe\n\nc=3\n\n".to_vec(),
                vec![Err(PolicyError::InvalidUtf8), ok(&[("c", "3")])],
            ),
            (
                "empty request",
                Limits::default(),
                b"\na=1\n\n".to_vec(),
                vec![Err(PolicyError::Empty), ok(&[("a", "1")])],
            ),
            (
                "truncated at eof",
                Limits::default(),
                b"a=1\n\nb=2\n".to_vec(),
                vec![ok(&[("a", "1")]), Err(PolicyError::Truncated)],
            ),
            (
                "truncated mid-line",
                Limits::default(),
                b"b=".to_vec(),
                vec![Err(PolicyError::Truncated)],
            ),
            (
                "truncated while discarding",
                small,
                b"b=0123456789abcdefghijk".to_vec(),
                vec![Err(PolicyError::Truncated)],
            ),
            ("nothing", Limits::default(), Vec::new(), vec![]),
        ];
        for (name, limits, input, want) in cases {
            for chunk in [1, 3, 7, input.len().max(1)] {
                assert_eq!(
                    decode_chunked(limits, &input, chunk),
                    want,
                    "{name} (chunks of {chunk})"
                );
            }
        }
    }

    #[test]
    fn long_garbage_line_is_not_buffered() {
        let mut codec = PolicyCodec::new(Limits::default());
        let mut buf = BytesMut::new();
        for _ in 0..100 {
            buf.extend_from_slice(&[b'x'; 10_000]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            assert!(buf.len() <= Limits::default().max_line + 10_000);
        }
        buf.extend_from_slice(b"\n\na=1\n\n");
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap_err(),
            PolicyError::LineTooLong
        );
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap().get("a"),
            Some("1")
        );
    }

    #[test]
    fn request_limit_is_capped_for_u16_positions() {
        let unbounded = Limits {
            max_line: usize::MAX,
            max_attributes: usize::MAX,
            max_request: usize::MAX,
        };
        let big = format!(
            "a={}\nb={}\nc=1\n\nd=2\n\n",
            "x".repeat(40_000),
            "y".repeat(40_000)
        );
        let got = decode_chunked(unbounded, big.as_bytes(), big.len());
        assert_eq!(
            got,
            vec![Err(PolicyError::RequestTooLarge), ok(&[("d", "2")])]
        );
        let fits = format!("a={}\nb=1\n\n", "x".repeat(60_000));
        let got = decode_chunked(unbounded, fits.as_bytes(), fits.len());
        assert_eq!(got, vec![ok(&[("a", &"x".repeat(60_000)), ("b", "1")])]);
    }

    #[test]
    fn query_view() {
        let input = b"request=delivery_report\nrecipient=u@gmail.com\nsender=\nmx_host=gmail-smtp-in.l.google.com\nmx_ip=142.250.1.27\nsource_ip=192.0.2.1\npool=bulk\nstatus=4.7.28\nreply=421 4.7.28 slow down\nfoo=bar\npolicy_context=t3\n\n";
        let mut codec = PolicyCodec::default();
        let req = codec
            .decode(&mut BytesMut::from(&input[..]))
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(req.request_type(), Some("delivery_report"));
        assert_eq!(req.get("foo"), Some("bar"));
        assert_eq!(req.get("missing"), None);
        assert_eq!(req.len(), 11);
        assert_eq!(req.as_bytes(), &input[..]);
        let q = req.query();
        let want = Query {
            kind: Kind::DeliveryReport,
            name: "delivery_report",
            recipient: Some("u@gmail.com"),
            sender: Some(""),
            mx_host: Some("gmail-smtp-in.l.google.com"),
            mx_ip: Some("142.250.1.27"),
            source_ip: Some("192.0.2.1"),
            pool: Some("bulk"),
            status: Some("4.7.28"),
            reply: Some("421 4.7.28 slow down"),
            domain: None,
            context: Some("t3"),
            key: None,
        };
        assert_eq!(q, want);
    }

    #[test]
    fn encode_table() {
        let full = Answer {
            reply: Reply::Action("DEFER"),
            class: Some(Class::RateLimited),
            provider: Some("gmail"),
            blamed: Some(Blamed::Ip),
            stage: Some("throttled"),
            retry_after: Some(120),
            concurrency: Some(2),
            rate: Some(0.25),
        };
        let cases: Vec<(Answer, &str)> = vec![
            (Answer::DUNNO, "action=DUNNO\n\n"),
            (Answer::action("REJECT 5.1.1 suppressed"), "action=REJECT 5.1.1 suppressed\n\n"),
            (Answer::action("HOLD a\nb"), "action=HOLD a b\n\n"),
            (Answer::perm("bad"), "action=DUNNO\n\n"),
            (Answer { rate: Some(f64::NAN), ..Answer::temp("x") }, "action=DUNNO\n\n"),
            (
                full,
                "action=DEFER\nclass=rate_limited\nprovider=gmail\nblamed=ip\nstage=throttled\nretry_after=120\nconcurrency=2\nrate=0.25\n\n",
            ),
            (Answer { rate: Some(5.0), ..Answer::DUNNO }, "action=DUNNO\nrate=5\n\n"),
            (Answer { rate: Some(1.0 / 3.0), ..Answer::DUNNO }, "action=DUNNO\nrate=0.333\n\n"),
            (Answer { rate: Some(f64::INFINITY), ..Answer::DUNNO }, "action=DUNNO\n\n"),
            (Answer { rate: Some(0.05), ..Answer::DUNNO }, "action=DUNNO\nrate=0.05\n\n"),
            (Answer { rate: Some(2.0005), ..Answer::DUNNO }, "action=DUNNO\nrate=2.001\n\n"),
            (Answer { rate: Some(0.0001), ..Answer::DUNNO }, "action=DUNNO\nrate=0\n\n"),
            (Answer { rate: Some(10.01), ..Answer::DUNNO }, "action=DUNNO\nrate=10.01\n\n"),
        ];
        for (answer, want) in cases {
            let mut dst = BytesMut::new();
            PolicyCodec::default().encode(&answer, &mut dst).unwrap();
            assert_eq!(std::str::from_utf8(&dst).unwrap(), want, "{answer:?}");
        }
    }
}
