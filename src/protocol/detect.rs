//! Which protocol a connection speaks, from its first bytes.
//!
//! The three protocols start differently: a netstring with digits and `:`, a JSON
//! object with `{`, a policy request with a lowercase attribute name and `=`. Only the
//! first line is looked at, and at most a few dozen bytes of it.

use super::Protocol;

/// Outcome of [`detect`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    Protocol(Protocol),
    /// Every byte so far fits a protocol; read more and ask again.
    NeedMore,
    /// No protocol starts like this.
    Unknown,
}

/// Longest netstring length prefix accepted (10 digits, like the codec).
const MAX_DIGITS: usize = 10;
/// Longest attribute name accepted (Postfix's longest is `ccert_pubkey_fingerprint`).
const MAX_NAME: usize = 64;

/// Pure: looks at `head` (the bytes received so far) and never consumes them.
pub fn detect(head: &[u8]) -> Detected {
    let Some(&first) = head.first() else {
        return Detected::NeedMore;
    };
    match first {
        b'{' => Detected::Protocol(Protocol::JsonLines),
        b'0'..=b'9' => scan(
            head,
            u8::is_ascii_digit,
            b':',
            MAX_DIGITS,
            Protocol::Socketmap,
        ),
        b'a'..=b'z' => scan(
            head,
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'),
            b'=',
            MAX_NAME,
            Protocol::Policy,
        ),
        _ => Detected::Unknown,
    }
}

/// `head` is a run of `class` bytes (at most `max`) ended by `end`.
fn scan(head: &[u8], class: fn(&u8) -> bool, end: u8, max: usize, protocol: Protocol) -> Detected {
    match head.iter().position(|b| !class(b)) {
        Some(i) if head[i] == end && i <= max => Detected::Protocol(protocol),
        Some(_) => Detected::Unknown,
        None if head.len() < max + 1 => Detected::NeedMore,
        None => Detected::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Detected::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], Detected)] = &[
            (b"", NeedMore),
            (b"{", Protocol(super::Protocol::JsonLines)),
            (
                b"{\"request\":\"delivery_report\"}\n",
                Protocol(super::Protocol::JsonLines),
            ),
            (b"1", NeedMore),
            (b"123", NeedMore),
            (b"11:", Protocol(super::Protocol::Socketmap)),
            (b"11:transport *,", Protocol(super::Protocol::Socketmap)),
            (b"0123456789", NeedMore),
            (b"0123456789:", Protocol(super::Protocol::Socketmap)),
            (b"01234567890", Unknown),
            (b"12a", Unknown),
            (b"12=", Unknown),
            (b"r", NeedMore),
            (b"request", NeedMore),
            (b"request=", Protocol(super::Protocol::Policy)),
            (
                b"request=smtpd_access_policy\n",
                Protocol(super::Protocol::Policy),
            ),
            (
                b"ccert_pubkey_fingerprint=",
                Protocol(super::Protocol::Policy),
            ),
            (b"x1_y=", Protocol(super::Protocol::Policy)),
            (b"Request=", Unknown),
            (b"request:", Unknown),
            (b"req uest=", Unknown),
            (b"=x", Unknown),
            (b"GET / HTTP/1.1\r\n", Unknown),
            (b"get / http", Unknown),
            (b"\x16\x03\x01", Unknown),
            (b" {", Unknown),
            (b":", Unknown),
        ];
        for (head, want) in cases {
            assert_eq!(detect(head), *want, "{:?}", String::from_utf8_lossy(head));
        }
        let long_name = [b'a'; MAX_NAME];
        assert_eq!(detect(&long_name), NeedMore);
        assert_eq!(
            detect(&[&long_name[..], b"="].concat()),
            Protocol(super::Protocol::Policy)
        );
        assert_eq!(detect(&[&long_name[..], b"a"].concat()), Unknown);
    }
}
