//! Test vectors of `proto/vectors/*.txt`: requests and the answers a fresh daemon with
//! the default config gives, replayed by the codec tests here and by the socket tests.
//!
//! Format (one directive per line; the full description is `proto/vectors/README.md`):
//!
//! ```text
//! # comment; comments and blank lines are ignored
//! === case name            starts a case (one connection)
//! >>> TEXT                 request bytes: TEXT then a newline (a policy or JSON line;
//!                          `>>>` alone is the blank line that ends a policy request)
//! >>: TEXT                 request bytes: TEXT framed as a netstring
//! >>| TEXT                 request bytes: TEXT exactly, nothing added
//! >>* COUNT TEXT           request bytes: TEXT repeated COUNT times (oversize input)
//! <<< TEXT                 expected: TEXT then a newline. Policy responses end with a
//!                          `<<<` alone; each JSON `<<<` line is one response.
//! <<: TEXT                 expected: one netstring whose payload is TEXT
//! !!! close                the daemon closes the connection after these responses
//! ```
//!
//! TEXT takes the escapes `\n`, `\r`, `\t`, `\s` (space, for trailing ones), `\\` and
//! `\xHH`. In expected TEXT, `{any}` matches a non-empty value (a run without
//! whitespace, `,`, `}`, `]` or `"`: numbers that depend on the daemon's state) and
//! `{text}` matches any text up to the end of the line.

use super::Protocol;

/// `proto/vectors/policy.txt`.
pub const POLICY: &str = include_str!("../../proto/vectors/policy.txt");
/// `proto/vectors/socketmap.txt`.
pub const SOCKETMAP: &str = include_str!("../../proto/vectors/socketmap.txt");
/// `proto/vectors/jsonl.txt`.
pub const JSONL: &str = include_str!("../../proto/vectors/jsonl.txt");

/// The shipped vector file of `protocol`.
pub fn builtin(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Policy => POLICY,
        Protocol::Socketmap => SOCKETMAP,
        Protocol::JsonLines => JSONL,
    }
}

/// The shipped vectors of `protocol`, parsed (they are checked by this module's tests).
pub fn builtin_cases(protocol: Protocol) -> Vec<Case> {
    parse(builtin(protocol), protocol).expect("shipped vectors parse")
}

/// One case: what a client sends on a fresh connection and what it must read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    /// Line of the `===` header, for failure messages.
    pub line: usize,
    /// Every request of the case, back to back (send at once to test pipelining, or
    /// byte by byte to test split reads).
    pub request: Vec<u8>,
    /// One entry per response, in order.
    pub responses: Vec<Expected>,
    /// The daemon closes the connection after the last response.
    pub closes: bool,
}

/// One expected response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The response is a netstring and `pattern` is its payload.
    pub netstring: bool,
    /// The response (or payload), with `{any}` / `{text}` placeholders.
    pub pattern: String,
}

impl Expected {
    /// Whether `response` (one whole response as cut by [`split_response`]) matches.
    pub fn matches(&self, response: &[u8]) -> bool {
        let body = if self.netstring {
            match split_netstring(response) {
                Some((payload, used)) if used == response.len() => payload,
                _ => return false,
            }
        } else {
            response
        };
        std::str::from_utf8(body).is_ok_and(|text| pattern_matches(&self.pattern, text))
    }
}

/// A line of a vector file that cannot be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct VectorError {
    pub line: usize,
    pub message: String,
}

/// Parses a vector file whose responses are in `protocol`'s framing.
pub fn parse(text: &str, protocol: Protocol) -> Result<Vec<Case>, VectorError> {
    let mut cases: Vec<Case> = Vec::new();
    let mut open_response = String::new();
    let err = |line: usize, message: String| VectorError { line, message };
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        if let Some(name) = raw.strip_prefix("=== ") {
            close_case(cases.last_mut(), &open_response, line)?;
            if cases.iter().any(|c| c.name == name) {
                return Err(err(line, format!("duplicate case name {name:?}")));
            }
            cases.push(Case {
                name: name.to_string(),
                line,
                request: Vec::new(),
                responses: Vec::new(),
                closes: false,
            });
            continue;
        }
        let case = cases
            .last_mut()
            .ok_or_else(|| err(line, "directive before the first === case".into()))?;
        if raw == "!!! close" {
            case.closes = true;
            continue;
        }
        let (tag, rest) = if raw.len() >= 3 && raw.is_char_boundary(3) {
            raw.split_at(3)
        } else {
            (raw, "")
        };
        let text = match rest.strip_prefix(' ') {
            Some(t) => t,
            None if rest.is_empty() => "",
            None => return Err(err(line, format!("expected a space after {tag:?}"))),
        };
        let bytes = if tag == ">>*" {
            Vec::new()
        } else {
            unescape(text).map_err(|m| err(line, m))?
        };
        match tag {
            ">>>" => {
                case.request.extend_from_slice(&bytes);
                case.request.push(b'\n');
            }
            ">>:" => {
                case.request
                    .extend_from_slice(format!("{}:", bytes.len()).as_bytes());
                case.request.extend_from_slice(&bytes);
                case.request.push(b',');
            }
            ">>|" => case.request.extend_from_slice(&bytes),
            ">>*" => {
                let (count, text) = text
                    .split_once(' ')
                    .ok_or_else(|| err(line, "expected `>>* COUNT TEXT`".into()))?;
                let count: usize = count
                    .parse()
                    .map_err(|_| err(line, format!("bad repeat count {count:?}")))?;
                let bytes = unescape(text).map_err(|m| err(line, m))?;
                case.request.extend_from_slice(&bytes.repeat(count));
            }
            "<<<" | "<<:" => {
                let pattern = String::from_utf8(bytes)
                    .map_err(|_| err(line, "expected text is not UTF-8".into()))?;
                if tag == "<<:" {
                    case.responses.push(Expected {
                        netstring: true,
                        pattern,
                    });
                } else if protocol == Protocol::Policy {
                    open_response.push_str(&pattern);
                    open_response.push('\n');
                    if pattern.is_empty() {
                        case.responses.push(Expected {
                            netstring: false,
                            pattern: std::mem::take(&mut open_response),
                        });
                    }
                } else {
                    case.responses.push(Expected {
                        netstring: false,
                        pattern: pattern + "\n",
                    });
                }
            }
            _ => return Err(err(line, format!("unknown directive {raw:?}"))),
        }
    }
    close_case(cases.last_mut(), &open_response, text.lines().count())?;
    Ok(cases)
}

fn close_case(
    case: Option<&mut Case>,
    open_response: &str,
    line: usize,
) -> Result<(), VectorError> {
    let Some(case) = case else { return Ok(()) };
    if !open_response.is_empty() {
        return Err(VectorError {
            line,
            message: format!(
                "case {:?}: policy response not ended by a blank `<<<`",
                case.name
            ),
        });
    }
    if case.request.is_empty() || case.responses.is_empty() {
        return Err(VectorError {
            line: case.line,
            message: format!("case {:?} needs a request and a response", case.name),
        });
    }
    Ok(())
}

/// Resolves `\n`, `\r`, `\t`, `\s`, `\\` and `\xHH`.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b's') => out.push(b' '),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = [bytes.next(), bytes.next()];
                let digits = match hex {
                    [Some(h), Some(l)] => std::str::from_utf8(&[h, l])
                        .ok()
                        .and_then(|s| u8::from_str_radix(s, 16).ok()),
                    _ => None,
                };
                out.push(digits.ok_or("\\x needs two hex digits")?);
            }
            Some(other) => return Err(format!("unknown escape \\{}", other as char)),
            None => return Err("trailing backslash".into()),
        }
    }
    Ok(out)
}

/// Length of the first complete response at the start of `buf`, in `protocol`'s
/// framing; `None` while incomplete. A response that is not a netstring where one is
/// due is returned whole (`buf.len()`) so that the comparison fails instead of waiting.
pub fn split_response(protocol: Protocol, buf: &[u8]) -> Option<usize> {
    match protocol {
        Protocol::Policy => buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2),
        Protocol::JsonLines => buf.iter().position(|&b| b == b'\n').map(|i| i + 1),
        Protocol::Socketmap => match netstring_header(buf) {
            Ok(Some((header, len))) => (buf.len() > header + len).then_some(header + len + 1),
            Ok(None) => None,
            Err(()) => Some(buf.len()),
        },
    }
}

/// `LEN:` → (header length, payload length); `Ok(None)` when incomplete.
fn netstring_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut len = 0usize;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'0'..=b'9' if i < 10 => len = len * 10 + usize::from(b - b'0'),
            b':' if i > 0 => return Ok(Some((i + 1, len))),
            _ => return Err(()),
        }
    }
    Ok(None)
}

/// The payload of the netstring at the start of `buf` and the bytes it used.
fn split_netstring(buf: &[u8]) -> Option<(&[u8], usize)> {
    let (header, len) = netstring_header(buf).ok()??;
    let end = header + len;
    (buf.len() > end && buf[end] == b',').then(|| (&buf[header..end], end + 1))
}

/// Whether `actual` matches `pattern` (`{any}` and `{text}` placeholders; any other
/// `{` is literal).
pub fn pattern_matches(pattern: &str, actual: &str) -> bool {
    let Some(open) = pattern.find('{') else {
        return pattern == actual;
    };
    let (literal, rest) = pattern.split_at(open);
    let Some(actual) = actual.strip_prefix(literal) else {
        return false;
    };
    let (after, longest, shortest) = if let Some(after) = rest.strip_prefix("{any}") {
        let run = actual
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ']' | '"'))
            .unwrap_or(actual.len());
        (after, run, 1)
    } else if let Some(after) = rest.strip_prefix("{text}") {
        (after, actual.find('\n').unwrap_or(actual.len()), 0)
    } else {
        return actual.starts_with('{') && pattern_matches(&rest[1..], &actual[1..]);
    };
    (shortest..=longest)
        .rev()
        .any(|n| actual.is_char_boundary(n) && pattern_matches(after, &actual[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{detect, Answer, Codec, Detected, Frame, Kind, Limits, ProtocolError};
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    /// What the codecs alone can answer: errors and unknown requests. Anything else
    /// needs the daemon's state (`None`).
    fn local_answer(
        item: &Result<Frame, ProtocolError>,
    ) -> (Option<Answer<'static>>, bool, Option<Kind>) {
        match item {
            Err(e) => (Some(Answer::for_error(e)), e.is_fatal(), None),
            Ok(frame) => match frame.parse() {
                Err(e) => (Some(Answer::for_error(&e)), e.is_fatal(), None),
                Ok(req) => {
                    let kind = req.query().kind;
                    (
                        (kind == Kind::Unknown).then(Answer::unknown_request),
                        false,
                        Some(kind),
                    )
                }
            },
        }
    }

    fn decode_all(
        protocol: Protocol,
        input: &[u8],
        chunk: usize,
    ) -> Vec<Result<Frame, ProtocolError>> {
        let mut codec = Codec::new(protocol, &Limits::default());
        let mut buf = BytesMut::new();
        let mut items = Vec::new();
        for part in input.chunks(chunk) {
            buf.extend_from_slice(part);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                items.push(item);
            }
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            items.push(item);
        }
        items
    }

    #[test]
    fn shipped_vectors_decode_with_the_codecs() {
        for &protocol in Protocol::ALL {
            let cases = builtin_cases(protocol);
            assert!(cases.len() >= 5, "{protocol:?}: {} cases", cases.len());
            let mut kinds = Vec::new();
            for case in &cases {
                // The replay relies on detection, so every case must open unambiguously.
                assert_eq!(
                    detect(&case.request),
                    Detected::Protocol(protocol),
                    "{}: first bytes",
                    case.name
                );
                let whole = decode_all(protocol, &case.request, case.request.len());
                let bytewise = decode_all(protocol, &case.request, 1);
                assert_eq!(whole.len(), bytewise.len(), "{}: split reads", case.name);
                assert_eq!(
                    whole.len(),
                    case.responses.len(),
                    "{} (line {}): requests vs responses",
                    case.name,
                    case.line
                );
                let mut fatal = false;
                for (item, expected) in whole.iter().zip(&case.responses) {
                    assert!(!fatal, "{}: a request after a fatal error", case.name);
                    let (answer, is_fatal, kind) = local_answer(item);
                    fatal = is_fatal;
                    kinds.extend(kind);
                    assert_eq!(
                        expected.netstring,
                        protocol == Protocol::Socketmap,
                        "{}",
                        case.name
                    );
                    match answer {
                        Some(answer) => {
                            let mut out = BytesMut::new();
                            Codec::new(protocol, &Limits::default())
                                .encode(&answer, &mut out)
                                .unwrap();
                            assert!(
                                expected.matches(&out),
                                "{}: {:?} does not match {:?}",
                                case.name,
                                String::from_utf8_lossy(&out),
                                expected.pattern
                            );
                            assert_eq!(
                                split_response(protocol, &out),
                                Some(out.len()),
                                "{}",
                                case.name
                            );
                        }
                        None => {
                            let well_formed = match protocol {
                                Protocol::Policy => {
                                    expected.pattern.starts_with("action=")
                                        && expected.pattern.ends_with("\n\n")
                                }
                                Protocol::JsonLines => {
                                    expected.pattern.starts_with("{\"action\":")
                                        && expected.pattern.ends_with("}\n")
                                }
                                Protocol::Socketmap => ["OK ", "NOTFOUND ", "TEMP ", "PERM "]
                                    .iter()
                                    .any(|w| expected.pattern.starts_with(w)),
                            };
                            assert!(well_formed, "{}: {:?}", case.name, expected.pattern);
                        }
                    }
                }
                assert_eq!(
                    case.closes, fatal,
                    "{}: `!!! close` iff the last error is fatal",
                    case.name
                );
            }
            // Every logical request of the protocol is covered.
            let want: &[Kind] = match protocol {
                Protocol::Socketmap => &[Kind::StatusLookup, Kind::TransportLookup, Kind::Unknown],
                _ => &[
                    Kind::AccessPolicy,
                    Kind::DeliveryReport,
                    Kind::DestinationQuery,
                    Kind::Unknown,
                ],
            };
            for k in want {
                assert!(kinds.contains(k), "{protocol:?}: no vector for {k:?}");
            }
        }
    }

    #[test]
    fn parse_format() {
        let text = "# c\n\n=== one\n>>> a=1\n>>>\n>>> b=\\s\n>>\n";
        assert_eq!(parse(text, Protocol::Policy).unwrap_err().line, 7);
        let text = "=== one\n>>> a=1\n>>* 2 b\\n\n>>>\n<<< action=DUNNO\n<<<\n=== two\n>>: transport *\n>>| 1:x,\n<<: NOTFOUND\\s\n!!! close\n";
        let cases = parse(text, Protocol::Policy).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].request, b"a=1\nb\nb\n\n");
        assert_eq!(
            cases[0].responses,
            vec![Expected {
                netstring: false,
                pattern: "action=DUNNO\n\n".into()
            }]
        );
        assert_eq!((cases[0].line, cases[0].closes), (1, false));
        assert_eq!(cases[1].request, b"11:transport *,1:x,");
        assert_eq!(
            cases[1].responses,
            vec![Expected {
                netstring: true,
                pattern: "NOTFOUND ".into()
            }]
        );
        assert!(cases[1].closes);
        let json = parse(
            "=== j\n>>> {}\n<<< {\"action\":\"DUNNO\"}\n<<< {}\n",
            Protocol::JsonLines,
        )
        .unwrap();
        assert_eq!(json[0].responses.len(), 2);
        assert_eq!(json[0].responses[0].pattern, "{\"action\":\"DUNNO\"}\n");
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, usize)] = &[
            (">>> a=1\n", 1),
            ("=== a\n>>> x\n<<< y\n<<<\n=== a\n", 5),
            ("=== a\n\u{e9}\u{e9}\n", 2),
            ("=== a\n>>>x\n", 2),
            ("=== a\n>>* x y\n", 2),
            ("=== a\n>>* 3\n", 2),
            ("=== a\n>>> \\q\n", 2),
            ("=== a\n>>> \\x4\n", 2),
            ("=== a\n>>> a=1\n<<< action=DUNNO\n", 3),
            ("=== a\n<<< x\n<<<\n", 1),
            ("=== a\n>>> x\n", 1),
            ("=== a\n>>> x\n<<< \\xff\n", 3),
        ];
        for (text, line) in cases {
            assert_eq!(
                parse(text, Protocol::Policy).map_err(|e| e.line),
                Err(*line),
                "{text:?}"
            );
        }
    }

    #[test]
    fn unescape_table() {
        assert_eq!(unescape(r"a\n\r\t\s\\\x41\x00").unwrap(), b"a\n\r\t \\A\0");
        for bad in [r"\", r"\x", r"\xg0", r"\y"] {
            assert!(unescape(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pattern_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("action=DUNNO\n\n", "action=DUNNO\n\n", true),
            ("rate={any}\n", "rate=0.25\n", true),
            ("rate={any}\n", "rate=\n", false),
            ("rate={any}\n", "rate=1 2\n", false),
            ("{\"rate\":{any},\"x\":1}", "{\"rate\":12.5,\"x\":1}", true),
            ("{\"stage\":\"{any}\"}", "{\"stage\":\"trusted\"}", true),
            ("{\"a\":{any}}", "{\"a\":\"s\"}", false),
            ("DEFER {text} seconds", "DEFER retry in 30 seconds", true),
            ("x{text}", "x", true),
            ("x{text}\ny", "x a\nb\ny", false),
            ("{any}{any}", "ab", true),
            ("{any}{any}", "a", false),
            ("{an", "{an", true),
            ("é{any}", "éü", true),
        ];
        for (pattern, actual, want) in cases {
            assert_eq!(
                pattern_matches(pattern, actual),
                *want,
                "{pattern:?} vs {actual:?}"
            );
        }
    }

    #[test]
    fn split_response_table() {
        let cases: &[(Protocol, &[u8], Option<usize>)] = &[
            (Protocol::Policy, b"action=DUNNO\n\naction=", Some(14)),
            (Protocol::Policy, b"action=DUNNO\n", None),
            (Protocol::JsonLines, b"{}\n{", Some(3)),
            (Protocol::JsonLines, b"{}", None),
            (Protocol::Socketmap, b"9:NOTFOUND ,9:", Some(12)),
            (Protocol::Socketmap, b"9:NOTFOUND", None),
            (Protocol::Socketmap, b"9", None),
            (Protocol::Socketmap, b"x", Some(1)),
        ];
        for (protocol, buf, want) in cases {
            assert_eq!(
                split_response(*protocol, buf),
                *want,
                "{protocol:?} {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        let ns = Expected {
            netstring: true,
            pattern: "NOTFOUND ".into(),
        };
        assert!(ns.matches(b"9:NOTFOUND ,"));
        assert!(!ns.matches(b"9:NOTFOUND ;"));
        assert!(!ns.matches(b"9:NOTFOUND ,x"));
        assert!(!ns.matches(b"NOTFOUND "));
    }
}
