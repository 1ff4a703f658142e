//! Wire protocols: framing, one request view and one answer for policy, socketmap and JSON lines.
//!
//! Each protocol module owns a tokio-util codec whose decoder yields
//! `Result<frame, error>` items: a bad request is an *item*, so it gets its own error
//! answer in order and the connection goes on; only `io::Error` ends the stream, and a
//! fatal framing error ([`ProtocolError::is_fatal`]) tells the caller to close.
//!
//! Whatever the protocol, a request is read through one borrowed [`Query`] and answered
//! with one [`Answer`], which the connection's protocol encodes. The server therefore
//! dispatches on [`Kind`] and never on the protocol:
//!
//! ```
//! use bytes::BytesMut;
//! use mxpace::protocol::{Answer, Codec, Kind, Limits, Protocol};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = Codec::new(Protocol::Socketmap, &Limits::default());
//! let mut buf = BytesMut::from(&b"29:transport someone@example.com,"[..]);
//! let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
//! let request = frame.parse().unwrap();
//! let query = request.query();
//! assert_eq!(query.kind, Kind::TransportLookup);
//! assert_eq!(query.recipient_domain(), Some("example.com"));
//! let mut out = BytesMut::new();
//! codec.encode(&Answer::not_found(), &mut out).unwrap();
//! assert_eq!(&out[..], b"9:NOTFOUND ,");
//! ```

pub mod detect;
pub mod jsonl;
pub mod policy;
pub mod socketmap;
pub mod vectors;

use bytes::BytesMut;
use std::io;
use tokio_util::codec::{Decoder, Encoder};

use crate::classify::{Blamed, Class};

pub use detect::{detect, Detected};
pub use jsonl::{JsonCodec, JsonError, JsonLine, JsonRequest};
pub use policy::{PolicyCodec, PolicyError, PolicyRequest};
pub use socketmap::{SocketmapCodec, SocketmapError, SocketmapRequest};

/// The three wire protocols a listener may speak.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Postfix policy delegation (`name=value` lines, blank line).
    Policy,
    /// Sendmail/Postfix socketmap (netstrings).
    Socketmap,
    /// One JSON object per line.
    JsonLines,
}

impl Protocol {
    pub const ALL: &'static [Protocol] =
        &[Protocol::Policy, Protocol::Socketmap, Protocol::JsonLines];

    /// Config / metric-label name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Policy => "policy",
            Protocol::Socketmap => "socketmap",
            Protocol::JsonLines => "jsonl",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.iter().copied().find(|p| p.as_str() == s)
    }
}

/// The logical request, the same whichever protocol carried it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    /// `request=smtpd_access_policy` (Postfix `check_policy_service`).
    AccessPolicy,
    /// `request=delivery_report`: one delivery attempt's reply, answered with limits.
    DeliveryReport,
    /// `request=destination_query`: a destination's limits, nothing reported.
    DestinationQuery,
    /// socketmap map `status[/context]` (`smtp_delivery_status_filter`).
    StatusLookup,
    /// socketmap map `transport[/context]` (`transport_maps`).
    TransportLookup,
    /// Anything else, or no request type at all; answered with [`Answer::unknown_request`].
    #[default]
    Unknown,
}

impl Kind {
    pub const ALL: &'static [Kind] = &[
        Kind::AccessPolicy,
        Kind::DeliveryReport,
        Kind::DestinationQuery,
        Kind::StatusLookup,
        Kind::TransportLookup,
        Kind::Unknown,
    ];

    /// The wire name (request type or socketmap map name); also the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::AccessPolicy => "smtpd_access_policy",
            Kind::DeliveryReport => "delivery_report",
            Kind::DestinationQuery => "destination_query",
            Kind::StatusLookup => "status",
            Kind::TransportLookup => "transport",
            Kind::Unknown => "unknown",
        }
    }

    /// Kind of a policy / JSON `request` value; socketmap map names are not request types.
    pub fn from_request(request: &str) -> Kind {
        match request {
            "smtpd_access_policy" => Kind::AccessPolicy,
            "delivery_report" => Kind::DeliveryReport,
            "destination_query" => Kind::DestinationQuery,
            _ => Kind::Unknown,
        }
    }

    /// Kind of a socketmap map name's base (the part before the first `/`).
    pub fn from_map(base: &str) -> Kind {
        match base {
            "status" => Kind::StatusLookup,
            "transport" => Kind::TransportLookup,
            _ => Kind::Unknown,
        }
    }
}

/// One request, protocol-neutral, borrowed from the connection's frame.
///
/// Fields are `None` when the request did not carry them; an empty value
/// (`sender=` for the null sender) is `Some("")`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Query<'a> {
    pub kind: Kind,
    /// The request type or the full socketmap map name as sent (for logs).
    pub name: &'a str,
    pub recipient: Option<&'a str>,
    pub sender: Option<&'a str>,
    /// MX host that gave the reply; for the status map, parsed from `host NAME[IP]`.
    pub mx_host: Option<&'a str>,
    pub mx_ip: Option<&'a str>,
    /// Sending IP (the identity a provider blames by default).
    pub source_ip: Option<&'a str>,
    /// Sending pool name, when the MTA groups source IPs.
    pub pool: Option<&'a str>,
    /// Enhanced status code (`status=`, or the first token of a status-map key).
    pub status: Option<&'a str>,
    /// Reply text, or the MTA's connection-failure text.
    pub reply: Option<&'a str>,
    /// Recipient domain for a `destination_query` that names no recipient.
    pub domain: Option<&'a str>,
    /// Attribution context: what follows the first `/` of a socketmap map name
    /// (`status/gmail/t3` → `gmail/t3`), or the `context` attribute / field
    /// (Postfix's `policy_context` for policy).
    pub context: Option<&'a str>,
    /// The raw socketmap key (for logs); `None` for policy and JSON.
    pub key: Option<&'a str>,
}

impl<'a> Query<'a> {
    /// Domain of the destination: the `domain` field, else what follows the last `@`
    /// of the recipient (`None` for `*` and addresses without a domain).
    pub fn recipient_domain(&self) -> Option<&'a str> {
        if let Some(d) = self.domain.filter(|d| !d.is_empty()) {
            return Some(d);
        }
        let r = self.recipient?;
        let at = r.rfind('@')?;
        Some(&r[at + 1..]).filter(|d| !d.is_empty())
    }
}

/// The outcome part of an [`Answer`], mapped onto each protocol's reply vocabulary.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// policy `action=<text>`; socketmap `OK <text>`; JSON `"action": text`.
    Action(&'a str),
    /// No opinion: policy `action=DUNNO`; socketmap `NOTFOUND `; JSON `"action":"DUNNO"`.
    NotFound,
    /// Temporary failure. Policy fails open (`action=DUNNO`; the caller logs the reason);
    /// socketmap `TEMP <reason>`; JSON `"action":"DUNNO","error": reason`.
    Temp(&'a str),
    /// Permanent failure (bad request). Policy `action=DUNNO`; socketmap `PERM <reason>`;
    /// JSON `"action":"DUNNO","error": reason`.
    Perm(&'a str),
}

/// What the daemon answers, before protocol encoding.
///
/// The limits are sent by policy and JSON only; a socketmap reply has room for the
/// [`Reply`] alone. Non-finite rates are left out.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Answer<'a> {
    pub reply: Reply<'a>,
    pub class: Option<Class>,
    /// Provider name from the classifier's table; `None` when not known.
    pub provider: Option<&'a str>,
    pub blamed: Option<Blamed>,
    /// Destination stage (`trusted`, `hesitating`, `throttled`, `rejecting`).
    pub stage: Option<&'a str>,
    /// Seconds until the destination admits the next message.
    pub retry_after: Option<u64>,
    /// The destination's current concurrency limit.
    pub concurrency: Option<u32>,
    /// The destination's current rate, messages per second.
    pub rate: Option<f64>,
}

/// The policy action that means "no opinion" (Postfix's own word).
pub const DUNNO: &str = "DUNNO";

impl<'a> Answer<'a> {
    /// `action=DUNNO` / `NOTFOUND ` with nothing else.
    pub const DUNNO: Answer<'static> = Answer::new(Reply::NotFound);

    pub const fn new(reply: Reply<'a>) -> Answer<'a> {
        Answer {
            reply,
            class: None,
            provider: None,
            blamed: None,
            stage: None,
            retry_after: None,
            concurrency: None,
            rate: None,
        }
    }

    /// A policy action (`DUNNO`, `DEFER_IF_PERMIT 4.7.1 …`, `REJECT 5.1.1 …`) or a
    /// socketmap value (`slow:[10.0.0.1]:25`, `retry:4.7.0 …`, `4.7.28 text`).
    pub const fn action(text: &'a str) -> Answer<'a> {
        Answer::new(Reply::Action(text))
    }

    pub const fn not_found() -> Answer<'static> {
        Answer::new(Reply::NotFound)
    }

    pub const fn temp(reason: &'a str) -> Answer<'a> {
        Answer::new(Reply::Temp(reason))
    }

    pub const fn perm(reason: &'a str) -> Answer<'a> {
        Answer::new(Reply::Perm(reason))
    }

    /// The answer to a request that could not be decoded (the caller logs a warning
    /// and counts `err.kind()`).
    pub fn for_error(err: &ProtocolError) -> Answer<'static> {
        Answer::perm(err.reason())
    }

    /// The answer to a request of [`Kind::Unknown`].
    pub const fn unknown_request() -> Answer<'static> {
        Answer::perm(UNKNOWN_REQUEST)
    }

    /// The error text, for `Temp` and `Perm`.
    pub fn error(&self) -> Option<&'a str> {
        match self.reply {
            Reply::Temp(r) | Reply::Perm(r) => Some(r),
            _ => None,
        }
    }

    /// Appends this answer, encoded for `protocol`, to `dst`.
    pub fn encode(&self, protocol: Protocol, dst: &mut BytesMut) -> io::Result<()> {
        match protocol {
            Protocol::Policy => policy::encode_answer(self, dst),
            Protocol::Socketmap => {
                socketmap::encode_answer(self, dst, socketmap::Limits::default().max_netstring)?
            }
            Protocol::JsonLines => jsonl::encode_answer(self, dst)?,
        }
        Ok(())
    }
}

/// Reason sent for [`Kind::Unknown`].
pub const UNKNOWN_REQUEST: &str = "unknown request type";

/// Limits for every protocol, one section each (the config maps onto this).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub policy: policy::Limits,
    pub socketmap: socketmap::Limits,
    pub jsonl: jsonl::Limits,
}

/// A request that failed to decode, whichever protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("socketmap: {0}")]
    Socketmap(#[from] SocketmapError),
    #[error("jsonl: {0}")]
    Json(#[from] JsonError),
}

impl ProtocolError {
    /// Stable snake_case name for the `protocol errors by kind` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Policy(e) => e.kind(),
            ProtocolError::Socketmap(e) => e.kind(),
            ProtocolError::Json(e) => e.kind(),
        }
    }

    /// The stream can no longer be trusted: send the error answer, then close.
    pub fn is_fatal(&self) -> bool {
        match self {
            ProtocolError::Policy(e) => e.is_fatal(),
            ProtocolError::Socketmap(e) => e.is_fatal(),
            ProtocolError::Json(e) => e.is_fatal(),
        }
    }

    /// Short reason sent on the wire (socketmap `PERM`, JSON `error`).
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::Policy(e) => e.reason(),
            ProtocolError::Socketmap(e) => e.reason(),
            ProtocolError::Json(e) => e.reason(),
        }
    }
}

/// One decoded frame of any protocol; [`Frame::parse`] gives its [`Request`].
///
/// A policy frame carries its attribute positions inline (about 200 bytes): moving
/// that is cheaper than allocating them per request.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Frame {
    Policy(PolicyRequest),
    Socketmap(SocketmapRequest),
    Json(JsonLine),
}

impl Frame {
    /// Parses the frame into a request view. Policy and socketmap frames were fully
    /// checked by their decoder and never fail here; JSON is parsed now (borrowing
    /// strings from the line unless they contain escapes).
    pub fn parse(&self) -> Result<Request<'_>, ProtocolError> {
        Ok(match self {
            Frame::Policy(r) => Request::Plain(r.query()),
            Frame::Socketmap(r) => Request::Plain(r.query()),
            Frame::Json(l) => Request::Json(l.parse()?),
        })
    }
}

/// A parsed request; it owns the unescaped JSON strings so that [`Request::query`]
/// can lend them.
#[derive(Clone, Debug)]
pub enum Request<'a> {
    Plain(Query<'a>),
    Json(JsonRequest<'a>),
}

impl Request<'_> {
    pub fn query(&self) -> Query<'_> {
        match self {
            Request::Plain(q) => *q,
            Request::Json(j) => j.query(),
        }
    }
}

/// The codec of one connection once its protocol is known.
///
/// The policy variant is large (its attribute positions are stored inline); there is
/// one codec per connection, so that costs less than a pointer chase on every decode.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Codec {
    Policy(PolicyCodec),
    Socketmap(SocketmapCodec),
    Json(JsonCodec),
}

impl Codec {
    pub fn new(protocol: Protocol, limits: &Limits) -> Codec {
        match protocol {
            Protocol::Policy => Codec::Policy(PolicyCodec::new(limits.policy)),
            Protocol::Socketmap => Codec::Socketmap(SocketmapCodec::new(limits.socketmap)),
            Protocol::JsonLines => Codec::Json(JsonCodec::new(limits.jsonl)),
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Codec::Policy(_) => Protocol::Policy,
            Codec::Socketmap(_) => Protocol::Socketmap,
            Codec::Json(_) => Protocol::JsonLines,
        }
    }
}

fn lift<F, E>(
    r: io::Result<Option<Result<F, E>>>,
    f: fn(F) -> Frame,
) -> io::Result<Option<Result<Frame, ProtocolError>>>
where
    ProtocolError: From<E>,
{
    r.map(|o| o.map(|i| i.map(f).map_err(ProtocolError::from)))
}

impl Decoder for Codec {
    type Item = Result<Frame, ProtocolError>;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        match self {
            Codec::Policy(c) => lift(c.decode(src), Frame::Policy),
            Codec::Socketmap(c) => lift(c.decode(src), Frame::Socketmap),
            Codec::Json(c) => lift(c.decode(src), Frame::Json),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> io::Result<Option<Self::Item>> {
        match self {
            Codec::Policy(c) => lift(c.decode_eof(src), Frame::Policy),
            Codec::Socketmap(c) => lift(c.decode_eof(src), Frame::Socketmap),
            Codec::Json(c) => lift(c.decode_eof(src), Frame::Json),
        }
    }
}

impl Encoder<&Answer<'_>> for Codec {
    type Error = io::Error;

    fn encode(&mut self, answer: &Answer<'_>, dst: &mut BytesMut) -> io::Result<()> {
        match self {
            Codec::Policy(c) => c.encode(answer, dst),
            Codec::Socketmap(c) => c.encode(answer, dst),
            Codec::Json(c) => c.encode(answer, dst),
        }
    }
}

/// `&bytes` as `&str`, for slices the decoder already validated as UTF-8.
fn utf8(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(protocol: Protocol, input: &[u8]) -> (Vec<Result<Kind, String>>, Vec<u8>) {
        let mut codec = Codec::new(protocol, &Limits::default());
        let mut buf = BytesMut::from(input);
        let mut kinds = Vec::new();
        let mut out = BytesMut::new();
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            let answer = match &item {
                Ok(frame) => {
                    let req = frame.parse();
                    match req {
                        Ok(r) => {
                            kinds.push(Ok(r.query().kind));
                            if r.query().kind == Kind::Unknown {
                                Answer::unknown_request()
                            } else {
                                Answer::DUNNO
                            }
                        }
                        Err(e) => {
                            kinds.push(Err(e.kind().to_string()));
                            Answer::for_error(&e)
                        }
                    }
                }
                Err(e) => {
                    kinds.push(Err(e.kind().to_string()));
                    Answer::for_error(e)
                }
            };
            codec.encode(&answer, &mut out).unwrap();
        }
        (kinds, out.to_vec())
    }

    #[test]
    fn same_requests_over_every_protocol() {
        type Case<'a> = (Protocol, &'a [u8], &'a [Result<Kind, &'a str>], &'a [u8]);
        let cases: &[Case] = &[
            (
                Protocol::Policy,
                b"request=delivery_report\nreply=250 ok\n\nrequest=nope\n\nbad line\n\n",
                &[Ok(Kind::DeliveryReport), Ok(Kind::Unknown), Err("malformed")],
                b"action=DUNNO\n\naction=DUNNO\n\naction=DUNNO\n\n",
            ),
            (
                Protocol::Socketmap,
                b"15:status 2.0.0 ok,9:nomap key,3:abc,",
                &[Ok(Kind::StatusLookup), Ok(Kind::Unknown), Err("malformed")],
                b"9:NOTFOUND ,25:PERM unknown request type,54:PERM malformed socketmap request (expected 'name key'),",
            ),
            (
                Protocol::JsonLines,
                b"{\"request\":\"destination_query\",\"domain\":\"x.test\"}\n{\"request\":1}\n",
                &[Ok(Kind::DestinationQuery), Err("invalid_json")],
                b"{\"action\":\"DUNNO\"}\n{\"action\":\"DUNNO\",\"error\":\"invalid JSON request\"}\n",
            ),
        ];
        for (protocol, input, kinds, output) in cases {
            let (got, out) = roundtrip(*protocol, input);
            let want: Vec<Result<Kind, String>> =
                kinds.iter().map(|k| k.map_err(str::to_string)).collect();
            assert_eq!(got, want, "{protocol:?}");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(output),
                "{protocol:?}"
            );
        }
    }

    /// The codecs as a connection uses them: split reads and EOF through `Framed`,
    /// answers written through the `Sink`.
    #[tokio::test]
    async fn framed_over_a_stream() {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::codec::Framed;

        let cases: &[(Protocol, &[u8], &[u8])] = &[
            (
                Protocol::Policy,
                b"request=smtpd_access_policy\nrecipient=a@b.test\n\nbad\n\nrequest=delivery_report\nreply=4",
                b"action=DUNNO\n\naction=DUNNO\n\naction=DUNNO\n\n",
            ),
            (
                Protocol::Socketmap,
                b"11:transport *,7:status ,x:",
                b"9:NOTFOUND ,9:NOTFOUND ,25:PERM bad netstring length,",
            ),
            (
                Protocol::JsonLines,
                b"{\"request\":\"delivery_report\"}\n{\"request\":\"x\"}\n{",
                b"{\"action\":\"DUNNO\"}\n{\"action\":\"DUNNO\",\"error\":\"unknown request type\"}\n{\"action\":\"DUNNO\",\"error\":\"truncated line\"}\n",
            ),
        ];
        for (protocol, input, want) in cases {
            let (client, server) = tokio::io::duplex(7);
            let serve = tokio::spawn({
                let protocol = *protocol;
                async move {
                    let mut framed = Framed::new(server, Codec::new(protocol, &Limits::default()));
                    while let Some(item) = framed.next().await {
                        let item = item.unwrap();
                        let fatal = item.as_ref().err().is_some_and(ProtocolError::is_fatal);
                        let answer = match &item {
                            Err(e) => Answer::for_error(e),
                            Ok(frame) => match frame.parse() {
                                Err(e) => Answer::for_error(&e),
                                Ok(r) if r.query().kind == Kind::Unknown => {
                                    Answer::unknown_request()
                                }
                                Ok(_) => Answer::not_found(),
                            },
                        };
                        framed.send(&answer).await.unwrap();
                        if fatal {
                            break;
                        }
                    }
                }
            });
            // Small writes into a 7-byte pipe: every request arrives in pieces. The
            // writer runs beside the reader, since answers come back meanwhile.
            let (mut rx, mut tx) = tokio::io::split(client);
            let input = input.to_vec();
            let write = tokio::spawn(async move {
                for part in input.chunks(5) {
                    tx.write_all(part).await.unwrap();
                }
                tx.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            write.await.unwrap();
            serve.await.unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want),
                "{protocol:?}"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::parse(p.as_str()), Some(*p));
        }
        for k in &Kind::ALL[..3] {
            assert_eq!(Kind::from_request(k.as_str()), *k);
        }
        assert_eq!(Kind::from_map("status"), Kind::StatusLookup);
        assert_eq!(Kind::from_map("transport"), Kind::TransportLookup);
        assert_eq!(Kind::from_request("status"), Kind::Unknown);
    }

    #[test]
    fn recipient_domain() {
        let cases: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
            (Some("a@b.test"), None, Some("b.test")),
            (Some("\"x@y\"@b.test"), None, Some("b.test")),
            (Some("*"), None, None),
            (Some("a@"), None, None),
            (Some("a@b.test"), Some("c.test"), Some("c.test")),
            (None, Some("c.test"), Some("c.test")),
            (None, None, None),
        ];
        for (recipient, domain, want) in cases {
            let q = Query {
                recipient: *recipient,
                domain: *domain,
                ..Query::default()
            };
            assert_eq!(q.recipient_domain(), *want, "{recipient:?} {domain:?}");
        }
    }

    #[test]
    fn answer_error_text() {
        assert_eq!(Answer::temp("busy").error(), Some("busy"));
        assert_eq!(Answer::unknown_request().error(), Some(UNKNOWN_REQUEST));
        assert_eq!(Answer::DUNNO.error(), None);
        assert_eq!(Answer::action("x").error(), None);
    }
}
