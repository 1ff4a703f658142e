//! Socketmap: netstring-framed `name key` lookups answered `OK`/`NOTFOUND`/`TEMP`/`PERM`.
//!
//! Postfix uses it for `smtp_delivery_status_filter` (map `status`) and
//! `transport_maps` (map `transport`). A map name may carry attribution context after
//! a `/` (`status/gmail/t3`), set per transport in `master.cf`, because the status
//! key itself names no recipient, domain or sender. A framing error (bad length,
//! oversize netstring, missing `,`) leaves no way to find the next request, so it is
//! fatal: the caller answers `PERM` and closes. A well-framed payload that is not
//! UTF-8 or not `name key` is answered `PERM` and the connection goes on.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use std::io;
use tokio_util::codec::{Decoder, Encoder};

use super::{utf8, Answer, Kind, Query, Reply};
use crate::classify::Enhanced;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest netstring payload, in bytes, for requests and replies. Postfix's own
    /// client refuses replies over 100000 bytes.
    pub max_netstring: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_netstring: 100_000,
        }
    }
}

/// Why a socketmap request was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SocketmapError {
    #[error("bad netstring length")]
    BadLength,
    #[error("netstring too long")]
    TooLong,
    #[error("netstring not terminated by ','")]
    MissingComma,
    #[error("invalid UTF-8")]
    InvalidUtf8,
    #[error("malformed request (expected 'name key')")]
    Malformed,
    #[error("connection closed in the middle of a netstring")]
    Truncated,
}

impl SocketmapError {
    pub const fn kind(self) -> &'static str {
        match self {
            SocketmapError::BadLength => "bad_length",
            SocketmapError::TooLong => "too_long",
            SocketmapError::MissingComma => "missing_comma",
            SocketmapError::InvalidUtf8 => "invalid_utf8",
            SocketmapError::Malformed => "malformed",
            SocketmapError::Truncated => "truncated",
        }
    }

    /// Framing is lost: answer, then close the connection.
    pub const fn is_fatal(self) -> bool {
        matches!(
            self,
            SocketmapError::BadLength
                | SocketmapError::TooLong
                | SocketmapError::MissingComma
                | SocketmapError::Truncated
        )
    }

    /// Text after `PERM `.
    pub const fn reason(self) -> &'static str {
        match self {
            SocketmapError::BadLength => "bad netstring length",
            SocketmapError::TooLong => "netstring too long",
            SocketmapError::MissingComma => "netstring not terminated by ','",
            SocketmapError::InvalidUtf8 => "invalid UTF-8 in socketmap request",
            SocketmapError::Malformed => "malformed socketmap request (expected 'name key')",
            SocketmapError::Truncated => "truncated netstring",
        }
    }
}

/// One lookup: the netstring payload `name SP key`, checked to be UTF-8.
#[derive(Clone, Debug)]
pub struct SocketmapRequest {
    payload: Bytes,
    /// Position of the space between map name and key.
    space: usize,
}

impl SocketmapRequest {
    /// Full map name as sent (`status/gmail/t3`).
    pub fn map(&self) -> &str {
        utf8(&self.payload[..self.space])
    }

    /// Map name before the first `/` (`status`).
    pub fn map_base(&self) -> &str {
        split_map(self.map()).0
    }

    /// What follows the first `/` of the map name (`gmail/t3`), if anything.
    pub fn context(&self) -> Option<&str> {
        split_map(self.map()).1
    }

    /// The lookup key (may be empty).
    pub fn key(&self) -> &str {
        utf8(&self.payload[self.space + 1..])
    }

    /// The raw payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.payload
    }

    /// The protocol-neutral view. For `status`, the key `<enhanced code> <text>` gives
    /// `status` and `reply`, and the text's `host NAME[IP]` gives `mx_host`/`mx_ip`;
    /// for `transport`, the key is the recipient (or `*`).
    pub fn query(&self) -> Query<'_> {
        let map = self.map();
        let (base, context) = split_map(map);
        let key = self.key();
        let mut q = Query {
            kind: Kind::from_map(base),
            name: map,
            context,
            key: Some(key),
            ..Query::default()
        };
        match q.kind {
            Kind::StatusLookup => {
                let (status, reply) = split_status(key);
                q.status = status;
                q.reply = Some(reply);
                if let Some((host, ip)) = postfix_peer(reply) {
                    q.mx_host = Some(host);
                    q.mx_ip = ip;
                }
            }
            Kind::TransportLookup => q.recipient = Some(key),
            _ => {}
        }
        q
    }
}

fn split_map(map: &str) -> (&str, Option<&str>) {
    match map.split_once('/') {
        Some((base, ctx)) => (base, Some(ctx).filter(|c| !c.is_empty())),
        None => (map, None),
    }
}

/// `4.7.28 host …` → (`Some("4.7.28")`, `host …`); a key without a leading enhanced
/// code is all reply text.
fn split_status(key: &str) -> (Option<&str>, &str) {
    match key.split_once(' ') {
        Some((code, rest)) if Enhanced::parse(code).is_some() => (Some(code), rest),
        None if Enhanced::parse(key).is_some() => (Some(key), ""),
        _ => (None, key),
    }
}

/// The remote host named by a Postfix smtp(8) status text, as the status filter sees
/// it (`host NAME[IP] said: …`, `connect to NAME[IP]:PORT: …`, `conversation with
/// NAME[IP] timed out …`, `lost connection with NAME[IP] while …`, `unable to look up
/// host NAME: …`). A success text names no host.
pub fn postfix_peer(text: &str) -> Option<(&str, Option<&str>)> {
    const PREFIXES: [&str; 5] = [
        "host ",
        "connect to ",
        "conversation with ",
        "lost connection with ",
        "unable to look up host ",
    ];
    let rest = PREFIXES.iter().find_map(|p| text.strip_prefix(p))?;
    let end = rest.find([' ', ':']).unwrap_or(rest.len());
    let token = &rest[..end];
    if let Some(open) = token.find('[') {
        let close = token[open..].find(']')? + open;
        let (host, ip) = (&token[..open], &token[open + 1..close]);
        return (!host.is_empty() && !ip.is_empty()).then_some((host, Some(ip)));
    }
    (!token.is_empty()).then_some((token, None))
}

/// Decoder of [`SocketmapRequest`]s and encoder of [`Answer`]s.
#[derive(Debug, Default)]
pub struct SocketmapCodec {
    limits: Limits,
    /// Header length (`LEN:`) and payload length of the netstring being received.
    pending: Option<(usize, usize)>,
    /// A fatal error was returned; everything after it is dropped.
    failed: bool,
}

/// More digits than this cannot be a sane length, whatever the limit.
const MAX_DIGITS: usize = 10;

impl SocketmapCodec {
    pub fn new(limits: Limits) -> SocketmapCodec {
        SocketmapCodec {
            limits,
            ..SocketmapCodec::default()
        }
    }

    fn fatal(
        &mut self,
        err: SocketmapError,
        buf: &mut BytesMut,
    ) -> io::Result<Option<Result<SocketmapRequest, SocketmapError>>> {
        self.failed = true;
        self.pending = None;
        buf.clear();
        Ok(Some(Err(err)))
    }

    /// Parses `LEN:`; `Ok(None)` when more bytes are needed.
    fn header(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, SocketmapError> {
        let mut len = 0usize;
        for (i, &b) in buf.iter().enumerate() {
            match b {
                b'0'..=b'9' if i < MAX_DIGITS => {
                    len = len * 10 + usize::from(b - b'0');
                    if len > self.limits.max_netstring {
                        return Err(SocketmapError::TooLong);
                    }
                }
                b':' if i > 0 => return Ok(Some((i + 1, len))),
                _ => return Err(SocketmapError::BadLength),
            }
        }
        Ok(None)
    }
}

impl Decoder for SocketmapCodec {
    type Item = Result<SocketmapRequest, SocketmapError>;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        if self.failed {
            buf.clear();
            return Ok(None);
        }
        let (header, len) = match self.pending {
            Some(p) => p,
            None => match self.header(buf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(None),
                Err(e) => return self.fatal(e, buf),
            },
        };
        let total = header + len + 1;
        if buf.len() < total {
            self.pending = Some((header, len));
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        self.pending = None;
        if buf[total - 1] != b',' {
            return self.fatal(SocketmapError::MissingComma, buf);
        }
        buf.advance(header);
        let payload = buf.split_to(len).freeze();
        buf.advance(1);
        if std::str::from_utf8(&payload).is_err() {
            return Ok(Some(Err(SocketmapError::InvalidUtf8)));
        }
        Ok(Some(match payload.iter().position(|&b| b == b' ') {
            Some(space) if space > 0 => Ok(SocketmapRequest { payload, space }),
            _ => Err(SocketmapError::Malformed),
        }))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        self.fatal(SocketmapError::Truncated, buf)
    }
}

impl Encoder<&Answer<'_>> for SocketmapCodec {
    type Error = io::Error;

    fn encode(&mut self, answer: &Answer<'_>, dst: &mut BytesMut) -> io::Result<()> {
        encode_answer(answer, dst, self.limits.max_netstring)
    }
}

/// Appends the netstring for `answer.reply`; the limits have no place in a socketmap
/// reply. A `TEMP`/`PERM` reason over `max` bytes is cut; an `OK` value over it is
/// an error, since a cut value would be a wrong answer.
pub fn encode_answer(answer: &Answer<'_>, dst: &mut BytesMut, max: usize) -> io::Result<()> {
    let (word, text) = match answer.reply {
        Reply::Action(v) => ("OK ", v),
        Reply::NotFound => ("NOTFOUND ", ""),
        Reply::Temp(r) => ("TEMP ", r),
        Reply::Perm(r) => ("PERM ", r),
    };
    let mut text = text;
    if word.len() + text.len() > max {
        if matches!(answer.reply, Reply::Action(_)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socketmap reply too long",
            ));
        }
        let mut cut = max.saturating_sub(word.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text = &text[..cut];
    }
    let len = word.len() + text.len();
    dst.reserve(len + 12);
    let _ = write!(dst, "{len}:");
    dst.put_slice(word.as_bytes());
    dst.put_slice(text.as_bytes());
    dst.put_u8(b',');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Got = Vec<Result<(String, String), SocketmapError>>;

    fn decode_chunked(limits: Limits, input: &[u8], chunk: usize) -> Got {
        let mut codec = SocketmapCodec::new(limits);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for part in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(part);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                got.push(item.map(|r| (r.map().to_string(), r.key().to_string())));
            }
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            got.push(item.map(|r| (r.map().to_string(), r.key().to_string())));
        }
        got
    }

    fn ok(map: &str, key: &str) -> Result<(String, String), SocketmapError> {
        Ok((map.to_string(), key.to_string()))
    }

    #[test]
    fn decode_table() {
        use SocketmapError::*;
        let small = Limits { max_netstring: 20 };
        let cases: Vec<(&str, Limits, &[u8], Got)> = vec![
            (
                "one",
                Limits::default(),
                b"11:transport *,",
                vec![ok("transport", "*")],
            ),
            (
                "pipelined",
                Limits::default(),
                b"11:transport *,42:status/gmail/t3 2.0.0 250 2.0.0 Ok: queued,",
                vec![
                    ok("transport", "*"),
                    ok("status/gmail/t3", "2.0.0 250 2.0.0 Ok: queued"),
                ],
            ),
            (
                "empty key",
                Limits::default(),
                b"7:status ,",
                vec![ok("status", "")],
            ),
            (
                "key with spaces",
                Limits::default(),
                b"9:status  x,",
                vec![ok("status", " x")],
            ),
            (
                "max length",
                small,
                b"20:transport 123456789@,",
                vec![ok("transport", "123456789@")],
            ),
            (
                "too long",
                small,
                b"21:transport 123456789@x,11:transport *,",
                vec![Err(TooLong)],
            ),
            (
                "huge length",
                Limits::default(),
                b"99999999999999999999:",
                vec![Err(TooLong)],
            ),
            (
                "many leading zeros",
                Limits::default(),
                b"00000000001:x,",
                vec![Err(BadLength)],
            ),
            (
                "letters",
                Limits::default(),
                b"GET / HTTP/1.0\r\n",
                vec![Err(BadLength)],
            ),
            ("no digits", Limits::default(), b":x,", vec![Err(BadLength)]),
            (
                "bad length char",
                Limits::default(),
                b"1x:a,",
                vec![Err(BadLength)],
            ),
            (
                "missing comma",
                Limits::default(),
                b"3:abc;11:transport *,",
                vec![Err(MissingComma)],
            ),
            (
                "invalid utf-8 continues",
                Limits::default(),
                b"4:s \xff\xfe,11:transport *,",
                vec![Err(InvalidUtf8), ok("transport", "*")],
            ),
            (
                "no space",
                Limits::default(),
                b"3:abc,11:transport *,",
                vec![Err(Malformed), ok("transport", "*")],
            ),
            (
                "empty name",
                Limits::default(),
                b"2: x,",
                vec![Err(Malformed)],
            ),
            (
                "empty payload",
                Limits::default(),
                b"0:,",
                vec![Err(Malformed)],
            ),
            (
                "truncated payload",
                Limits::default(),
                b"11:transport",
                vec![Err(Truncated)],
            ),
            (
                "truncated header",
                Limits::default(),
                b"11",
                vec![Err(Truncated)],
            ),
            ("nothing", Limits::default(), b"", vec![]),
        ];
        for (name, limits, input, want) in cases {
            for chunk in [1, 2, 5, input.len().max(1)] {
                assert_eq!(
                    decode_chunked(limits, input, chunk),
                    want,
                    "{name} (chunks of {chunk})"
                );
            }
        }
    }

    #[test]
    fn status_queries() {
        // key, status, mx_host, mx_ip
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let cases: &[Case] = &[
            ("2.0.0 250 2.0.0 Ok: queued", Some("2.0.0"), None, None),
            (
                "4.7.28 host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected 421 4.7.28 rate (in reply to RCPT TO command)",
                Some("4.7.28"),
                Some("gmail-smtp-in.l.google.com"),
                Some("142.250.1.27"),
            ),
            ("4.4.1 connect to 127.0.0.9[127.0.0.9]:2525: Connection refused", Some("4.4.1"), Some("127.0.0.9"), Some("127.0.0.9")),
            (
                "4.4.2 conversation with 127.0.0.4[127.0.0.4] timed out while receiving the initial server greeting",
                Some("4.4.2"),
                Some("127.0.0.4"),
                Some("127.0.0.4"),
            ),
            ("4.4.2 lost connection with mx.test[10.0.0.1] while sending RCPT TO", Some("4.4.2"), Some("mx.test"), Some("10.0.0.1")),
            ("4.3.2 host 127.0.0.3[127.0.0.3] refused to talk to me: 421 4.3.2 x", Some("4.3.2"), Some("127.0.0.3"), Some("127.0.0.3")),
            ("5.4.4 unable to look up host nohop.test: Name or service not known", Some("5.4.4"), Some("nohop.test"), None),
            ("garbage without code", None, None, None),
            ("4.7.1", Some("4.7.1"), None, None),
            ("4.7.1 host [broken said", Some("4.7.1"), None, None),
        ];
        for (key, status, host, ip) in cases {
            let payload = format!("status/gmail/t3 {key}");
            let wire = format!("{}:{payload},", payload.len());
            let req = SocketmapCodec::default()
                .decode(&mut BytesMut::from(wire.as_bytes()))
                .unwrap()
                .unwrap()
                .unwrap();
            let q = req.query();
            assert_eq!(q.kind, Kind::StatusLookup, "{key}");
            assert_eq!(q.name, "status/gmail/t3");
            assert_eq!(q.context, Some("gmail/t3"));
            assert_eq!(q.key, Some(*key));
            assert_eq!(
                (q.status, q.mx_host, q.mx_ip),
                (*status, *host, *ip),
                "{key}"
            );
            let reply = q.reply.unwrap();
            assert!(key.ends_with(reply), "{key}");
            assert_eq!(q.recipient, None);
        }
    }

    #[test]
    fn map_names() {
        // payload, kind, map base, context, recipient
        type Case<'a> = (&'a str, Kind, &'a str, Option<&'a str>, Option<&'a str>);
        let cases: &[Case] = &[
            (
                "transport u@b.test",
                Kind::TransportLookup,
                "transport",
                None,
                Some("u@b.test"),
            ),
            (
                "transport/t2 u@b.test",
                Kind::TransportLookup,
                "transport",
                Some("t2"),
                Some("u@b.test"),
            ),
            (
                "transport/ *",
                Kind::TransportLookup,
                "transport",
                None,
                Some("*"),
            ),
            ("status x", Kind::StatusLookup, "status", None, None),
            ("statusfilter x", Kind::Unknown, "statusfilter", None, None),
            ("virtual u@b.test", Kind::Unknown, "virtual", None, None),
        ];
        for (payload, kind, base, context, recipient) in cases {
            let wire = format!("{}:{payload},", payload.len());
            let req = SocketmapCodec::default()
                .decode(&mut BytesMut::from(wire.as_bytes()))
                .unwrap()
                .unwrap()
                .unwrap();
            let q = req.query();
            assert_eq!(
                (q.kind, req.map_base(), q.context, req.context()),
                (*kind, *base, *context, *context),
                "{payload}"
            );
            assert_eq!(q.recipient, *recipient, "{payload}");
        }
    }

    #[test]
    fn encode_table() {
        let long = "x".repeat(30);
        let cases: Vec<(Answer, usize, Result<&str, ()>)> = vec![
            (Answer::not_found(), 100, Ok("9:NOTFOUND ,")),
            (
                Answer::action("slow:[127.0.0.2]:2525"),
                100,
                Ok("24:OK slow:[127.0.0.2]:2525,"),
            ),
            (
                Answer::action("retry:4.7.0 gmail suspended"),
                100,
                Ok("30:OK retry:4.7.0 gmail suspended,"),
            ),
            (Answer::temp("busy"), 100, Ok("9:TEMP busy,")),
            (
                Answer::perm("unknown request type"),
                100,
                Ok("25:PERM unknown request type,"),
            ),
            (Answer::perm(&long), 10, Ok("10:PERM xxxxx,")),
            (
                Answer::perm("\u{e9}\u{e9}\u{e9}"),
                10,
                Ok("9:PERM \u{e9}\u{e9},"),
            ),
            (Answer::action(&long), 10, Err(())),
        ];
        for (answer, max, want) in cases {
            let mut dst = BytesMut::new();
            let got = SocketmapCodec::new(Limits { max_netstring: max }).encode(&answer, &mut dst);
            match want {
                Ok(w) => {
                    got.unwrap();
                    assert_eq!(std::str::from_utf8(&dst).unwrap(), w, "{answer:?}");
                }
                Err(()) => assert!(got.is_err(), "{answer:?}"),
            }
        }
    }
}
