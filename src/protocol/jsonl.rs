//! JSON lines: one request object per line in, one answer object per line out.
//!
//! Field names are the policy attribute names. Strings are borrowed from the line
//! unless they contain escapes; unknown fields are ignored. An oversize line is
//! discarded up to its newline (never buffered) and answered with an error object, so
//! the connection stays in sync.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize};
use std::borrow::Cow;
use std::io;
use tokio_util::codec::{Decoder, Encoder};

use super::{Answer, Kind, Query, Reply, DUNNO};
use crate::classify::{Blamed, Class};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, without its newline.
    pub max_line: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line: 16 * 1024,
        }
    }
}

/// Why a JSON line was refused. None of these desynchronise the stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("line too long")]
    LineTooLong,
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// Not a JSON object of the expected shape; the text is serde's, for the log.
    #[error("invalid JSON request: {0}")]
    Invalid(Box<str>),
    #[error("connection closed in the middle of a line")]
    Truncated,
}

impl JsonError {
    pub fn kind(&self) -> &'static str {
        match self {
            JsonError::LineTooLong => "line_too_long",
            JsonError::InvalidUtf8 => "invalid_utf8",
            JsonError::Invalid(_) => "invalid_json",
            JsonError::Truncated => "truncated",
        }
    }

    pub fn is_fatal(&self) -> bool {
        matches!(self, JsonError::Truncated)
    }

    /// The answer's `error` text.
    pub fn reason(&self) -> &'static str {
        match self {
            JsonError::LineTooLong => "line too long",
            JsonError::InvalidUtf8 => "invalid UTF-8",
            JsonError::Invalid(_) => "invalid JSON request",
            JsonError::Truncated => "truncated line",
        }
    }
}

/// One line (newline and a trailing `\r` removed), checked to be UTF-8.
#[derive(Clone, Debug)]
pub struct JsonLine {
    line: Bytes,
}

impl JsonLine {
    pub fn as_bytes(&self) -> &[u8] {
        &self.line
    }

    pub fn parse(&self) -> Result<JsonRequest<'_>, JsonError> {
        parse_request(&self.line)
    }
}

/// Parses one request line.
fn parse_request(line: &[u8]) -> Result<JsonRequest<'_>, JsonError> {
    // serde fills a struct from an array too (`["delivery_report"]` would be a
    // report); a request is an object and nothing else.
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(JsonError::Invalid("a request is a JSON object".into()));
    }
    serde_json::from_slice(line).map_err(|e| JsonError::Invalid(e.to_string().into()))
}

/// A request object. Every field is optional; which ones a request needs is the
/// server's business, as for policy attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct JsonRequest<'a> {
    #[serde(borrow, deserialize_with = "opt_str")]
    pub request: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub recipient: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub sender: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub mx_host: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub mx_ip: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub source_ip: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub pool: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub status: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub reply: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub domain: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "opt_str")]
    pub context: Option<Cow<'a, str>>,
}

/// serde's own `Cow<str>` always copies; borrowing needs the `borrow` path on a bare
/// `Cow`, hence the newtype.
fn opt_str<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'b>(#[serde(borrow)] Cow<'b, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

impl JsonRequest<'_> {
    pub fn query(&self) -> Query<'_> {
        let name = self.request.as_deref().unwrap_or("");
        Query {
            kind: Kind::from_request(name),
            name,
            recipient: self.recipient.as_deref(),
            sender: self.sender.as_deref(),
            mx_host: self.mx_host.as_deref(),
            mx_ip: self.mx_ip.as_deref(),
            source_ip: self.source_ip.as_deref(),
            pool: self.pool.as_deref(),
            status: self.status.as_deref(),
            reply: self.reply.as_deref(),
            domain: self.domain.as_deref(),
            context: self.context.as_deref().filter(|c| !c.is_empty()),
            key: None,
        }
    }
}

/// Decoder of [`JsonLine`]s and encoder of [`Answer`]s.
#[derive(Debug, Default)]
pub struct JsonCodec {
    limits: Limits,
    /// Bytes of the current line already searched for a newline.
    scanned: usize,
    /// Discarding the rest of an oversize line.
    discarding: bool,
}

impl JsonCodec {
    pub fn new(limits: Limits) -> JsonCodec {
        JsonCodec {
            limits,
            ..JsonCodec::default()
        }
    }
}

impl Decoder for JsonCodec {
    type Item = Result<JsonLine, JsonError>;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        loop {
            let Some(i) = memchr::memchr(b'\n', &buf[self.scanned..]) else {
                if self.discarding {
                    buf.clear();
                    self.scanned = 0;
                } else if buf.len() > self.limits.max_line {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                } else {
                    self.scanned = buf.len();
                }
                return Ok(None);
            };
            let nl = self.scanned + i;
            self.scanned = 0;
            let mut line = buf.split_to(nl + 1);
            if std::mem::take(&mut self.discarding) {
                return Ok(Some(Err(JsonError::LineTooLong)));
            }
            line.truncate(nl);
            if line.last() == Some(&b'\r') {
                line.truncate(nl - 1);
            }
            if line.len() > self.limits.max_line {
                return Ok(Some(Err(JsonError::LineTooLong)));
            }
            // Blank lines are not requests and get no answer.
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if std::str::from_utf8(&line).is_err() {
                return Ok(Some(Err(JsonError::InvalidUtf8)));
            }
            return Ok(Some(Ok(JsonLine {
                line: line.freeze(),
            })));
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        let pending = self.discarding || !buf.iter().all(u8::is_ascii_whitespace);
        buf.clear();
        self.scanned = 0;
        self.discarding = false;
        Ok(pending.then_some(Err(JsonError::Truncated)))
    }
}

/// The answer object, fields in a fixed order.
#[derive(Serialize)]
struct Out<'a> {
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<Class>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blamed: Option<Blamed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Encoder<&Answer<'_>> for JsonCodec {
    type Error = io::Error;

    fn encode(&mut self, answer: &Answer<'_>, dst: &mut BytesMut) -> io::Result<()> {
        encode_answer(answer, dst)
    }
}

/// Appends the answer object and its newline. Errors carry `"action":"DUNNO"` (fail
/// open, as for policy) and `"error"`, without limits.
pub fn encode_answer(a: &Answer<'_>, dst: &mut BytesMut) -> io::Result<()> {
    let out = match a.reply {
        Reply::Temp(e) | Reply::Perm(e) => Out {
            action: DUNNO,
            class: None,
            provider: None,
            blamed: None,
            stage: None,
            retry_after: None,
            concurrency: None,
            rate: None,
            error: Some(e),
        },
        Reply::Action(_) | Reply::NotFound => Out {
            action: match a.reply {
                Reply::Action(text) => text,
                _ => DUNNO,
            },
            class: a.class,
            provider: a.provider,
            blamed: a.blamed,
            stage: a.stage,
            retry_after: a.retry_after,
            concurrency: a.concurrency,
            // Three decimals, as for policy; serde_json would write NaN as null.
            rate: a
                .rate
                .filter(|r| r.is_finite())
                .map(|r| (r * 1000.0).round() / 1000.0),
            error: None,
        },
    };
    serde_json::to_writer(dst.writer(), &out)?;
    dst.put_u8(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    type Got = Vec<Result<String, JsonError>>;

    fn decode_chunked(limits: Limits, input: &[u8], chunk: usize) -> Got {
        let mut codec = JsonCodec::new(limits);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for part in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(part);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                got.push(item.map(|l| String::from_utf8(l.as_bytes().to_vec()).unwrap()));
            }
            assert!(
                buf.len() <= limits.max_line + chunk + 1,
                "buffer grew to {}",
                buf.len()
            );
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            got.push(item.map(|l| String::from_utf8(l.as_bytes().to_vec()).unwrap()));
        }
        got
    }

    #[test]
    fn decode_table() {
        use JsonError::*;
        let small = Limits { max_line: 8 };
        let cases: Vec<(&str, Limits, &[u8], Got)> = vec![
            (
                "one",
                Limits::default(),
                b"{\"a\":1}\n",
                vec![Ok("{\"a\":1}".into())],
            ),
            (
                "pipelined",
                Limits::default(),
                b"{}\n{\"b\":2}\n",
                vec![Ok("{}".into()), Ok("{\"b\":2}".into())],
            ),
            (
                "crlf and blank lines",
                Limits::default(),
                b"\n \r\n{}\r\n\n",
                vec![Ok("{}".into())],
            ),
            (
                "at the limit",
                small,
                b"{\"a\":12}\n",
                vec![Ok("{\"a\":12}".into())],
            ),
            (
                "too long, then resync",
                small,
                b"{\"a\":1234}\n{}\n",
                vec![Err(LineTooLong), Ok("{}".into())],
            ),
            (
                "too long without newline yet",
                small,
                b"{\"a\":\"xxxxxxxxxxxxxxxxxxxxxxx\"}\n{}\n",
                vec![Err(LineTooLong), Ok("{}".into())],
            ),
            (
                "invalid utf-8",
                Limits::default(),
                b"{\"a\":\"\xff\"}\n{}\n",
                vec![Err(InvalidUtf8), Ok("{}".into())],
            ),
            (
                "truncated",
                Limits::default(),
                b"{}\n{\"a\"",
                vec![Ok("{}".into()), Err(Truncated)],
            ),
            (
                "truncated while discarding",
                small,
                b"{\"a\":\"xxxxxxxxxxxxxxx",
                vec![Err(Truncated)],
            ),
            (
                "trailing blank",
                Limits::default(),
                b"{}\n  ",
                vec![Ok("{}".into())],
            ),
        ];
        for (name, limits, input, want) in cases {
            for chunk in [1, 3, input.len().max(1)] {
                assert_eq!(
                    decode_chunked(limits, input, chunk),
                    want,
                    "{name} (chunks of {chunk})"
                );
            }
        }
    }

    fn parse(line: &str) -> Result<JsonRequest<'_>, JsonError> {
        parse_request(line.as_bytes())
    }

    #[test]
    fn parse_table() {
        let ok: &[(&str, Kind, Option<&str>, Option<&str>)] = &[
            (
                r#"{"request":"delivery_report","recipient":"u@gmail.com","reply":"421 4.7.28 x"}"#,
                Kind::DeliveryReport,
                Some("u@gmail.com"),
                Some("421 4.7.28 x"),
            ),
            (
                r#"{"request":"smtpd_access_policy","recipient":"a@b.test","unknown":{"x":[1,2]}}"#,
                Kind::AccessPolicy,
                Some("a@b.test"),
                None,
            ),
            (
                r#"{"request":"destination_query","recipient":null}"#,
                Kind::DestinationQuery,
                None,
                None,
            ),
            (r#"{"request":"what"}"#, Kind::Unknown, None, None),
            (r#"{}"#, Kind::Unknown, None, None),
            (
                r#"{"request":"delivery_report","reply":"550 \"quoted\" \u00e9"}"#,
                Kind::DeliveryReport,
                None,
                Some("550 \"quoted\" \u{e9}"),
            ),
        ];
        for (line, kind, recipient, reply) in ok {
            let req = parse(line).unwrap();
            let q = req.query();
            assert_eq!(
                (q.kind, q.recipient, q.reply),
                (*kind, *recipient, *reply),
                "{line}"
            );
        }
        for bad in [
            r#"[1]"#,
            r#"["delivery_report"]"#,
            r#" ["smtpd_access_policy", "a@b.test"]"#,
            r#""x""#,
            r#"{"request":1}"#,
            r#"{"request":"a","request":"b"}"#,
            r#"{"a":1"#,
            "nul",
        ] {
            assert!(matches!(parse(bad), Err(JsonError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn strings_borrow_from_the_line_unless_escaped() {
        let req = parse(r#"{"recipient":"u@b.test","reply":"a\"b"}"#).unwrap();
        assert!(matches!(req.recipient, Some(Cow::Borrowed(_))));
        assert!(matches!(req.reply, Some(Cow::Owned(_))));
    }

    #[test]
    fn line_parse_from_codec() {
        let mut codec = JsonCodec::default();
        let mut buf =
            BytesMut::from(&b"{\"request\":\"delivery_report\",\"mx_host\":\"mx.test\"}\nrest"[..]);
        let line = codec.decode(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(line.parse().unwrap().query().mx_host, Some("mx.test"));
        buf.advance(4);
        assert!(buf.is_empty());
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
            rate: Some(1.0 / 3.0),
        };
        let cases: Vec<(Answer, &str)> = vec![
            (Answer::DUNNO, r#"{"action":"DUNNO"}"#),
            (
                Answer::action("REJECT 5.1.1 \"x\""),
                r#"{"action":"REJECT 5.1.1 \"x\""}"#,
            ),
            (
                Answer {
                    class: Some(Class::Delivered),
                    ..Answer::perm("bad")
                },
                r#"{"action":"DUNNO","error":"bad"}"#,
            ),
            (
                full,
                r#"{"action":"DEFER","class":"rate_limited","provider":"gmail","blamed":"ip","stage":"throttled","retry_after":120,"concurrency":2,"rate":0.333}"#,
            ),
            (
                Answer {
                    rate: Some(f64::NAN),
                    ..Answer::DUNNO
                },
                r#"{"action":"DUNNO"}"#,
            ),
        ];
        for (answer, want) in cases {
            let mut dst = BytesMut::new();
            JsonCodec::default().encode(&answer, &mut dst).unwrap();
            assert_eq!(
                std::str::from_utf8(&dst).unwrap(),
                format!("{want}\n"),
                "{answer:?}"
            );
        }
    }
}
