//! The vocabulary of a classification: classes, blamed identities, SMTP stages and codes.
//!
//! These types are shared by every layer (protocol answers, shaping, metrics), so they
//! are small `Copy` values with stable snake_case names used on the wire and in JSON.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every variant, in declaration order (stable: used for metric label sets).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire / JSON / label name.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the wire name; `None` for anything else.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// What a reply means for the message and the destination.
    Class {
        Delivered => "delivered",
        RecipientUnknown => "recipient_unknown",
        DomainInvalid => "domain_invalid",
        MailboxDisabled => "mailbox_disabled",
        MailboxFull => "mailbox_full",
        TempFailure => "temp_failure",
        Greylisted => "greylisted",
        RateLimited => "rate_limited",
        ReputationBlock => "reputation_block",
        SpamRejected => "spam_rejected",
        PolicyRejected => "policy_rejected",
        AuthFailure => "auth_failure",
        ContentRejected => "content_rejected",
        MessageTooLarge => "message_too_large",
        NetworkError => "network_error",
        ProtocolError => "protocol_error",
        RelayDenied => "relay_denied",
        Unknown => "unknown",
    }
}

named_enum! {
    /// Which sending identity the receiver distrusts; throttles key on it.
    Blamed {
        Ip => "ip",
        SpfDomain => "spf_domain",
        DkimDomain => "dkim_domain",
        FromDomain => "from_domain",
        Recipient => "recipient",
        Message => "message",
        None => "none",
    }
}

named_enum! {
    /// The SMTP stage the reply answered, when the reply form says so.
    SmtpStage {
        Connect => "connect",
        Greeting => "greeting",
        Helo => "helo",
        StartTls => "starttls",
        MailFrom => "mail_from",
        RcptTo => "rcpt_to",
        Data => "data",
        EndOfData => "end_of_data",
        Quit => "quit",
    }
}

impl Class {
    /// The identity a class blames when no rule says otherwise.
    pub const fn default_blamed(self) -> Blamed {
        match self {
            Class::RecipientUnknown
            | Class::DomainInvalid
            | Class::MailboxDisabled
            | Class::MailboxFull
            | Class::TempFailure => Blamed::Recipient,
            Class::RateLimited | Class::ReputationBlock => Blamed::Ip,
            Class::SpamRejected | Class::ContentRejected | Class::MessageTooLarge => {
                Blamed::Message
            }
            Class::AuthFailure => Blamed::FromDomain,
            _ => Blamed::None,
        }
    }

    /// Hard bounces that make an address worth suppressing.
    pub const fn is_address_failure(self) -> bool {
        matches!(
            self,
            Class::RecipientUnknown | Class::DomainInvalid | Class::MailboxDisabled
        )
    }
}

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Enhanced {
    /// Parses `X.Y.Z` exactly (class 2, 4 or 5; subject and detail up to 3 digits).
    pub fn parse(s: &str) -> Option<Self> {
        match Self::parse_prefix(s.as_bytes()) {
            Some((e, n)) if n == s.len() => Some(e),
            _ => None,
        }
    }

    /// `X.Y.Z` at the start of `b`, ended by anything but a digit or a dot: the code and
    /// its length. Byte-wise: this runs on every reply.
    pub fn parse_prefix(b: &[u8]) -> Option<(Self, usize)> {
        if b.len() < 5 || !matches!(b[0], b'2' | b'4' | b'5') || b[1] != b'.' {
            return None;
        }
        let (subject, n) = Self::number(&b[2..])?;
        let rest = &b[2 + n..];
        if rest.first() != Some(&b'.') {
            return None;
        }
        let (detail, m) = Self::number(&rest[1..])?;
        let len = 3 + n + m;
        if b.get(len).is_some_and(|&c| c.is_ascii_digit() || c == b'.') {
            return None;
        }
        Some((
            Enhanced {
                class: b[0] - b'0',
                subject,
                detail,
            },
            len,
        ))
    }

    /// The run of digits at the start of `b`, if it is one to three digits long.
    fn number(b: &[u8]) -> Option<(u16, usize)> {
        let mut v = 0u16;
        let mut n = 0;
        // A fourth digit already makes the run too long.
        while n < 4 && n < b.len() && b[n].is_ascii_digit() {
            v = v * 10 + (b[n] - b'0') as u16;
            n += 1;
        }
        (1..=3).contains(&n).then_some((v, n))
    }

    pub const fn is_permanent(self) -> bool {
        self.class == 5
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Serialize for Enhanced {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Class::ALL {
            assert_eq!(Class::parse(c.as_str()), Some(*c));
        }
        for b in Blamed::ALL {
            assert_eq!(Blamed::parse(b.as_str()), Some(*b));
        }
        assert_eq!(Class::ALL.len(), 18);
    }

    #[test]
    fn enhanced_parse() {
        let e = Enhanced::parse("4.7.650").unwrap();
        assert_eq!((e.class, e.subject, e.detail), (4, 7, 650));
        assert_eq!(e.to_string(), "4.7.650");
        for bad in [
            "", "4.7", "3.1.1", "4.7.6500", "4..1", "a.b.c", "4.7.1.", "5.1234.1", "45.1.1",
        ] {
            assert_eq!(Enhanced::parse(bad), None, "{bad}");
        }
        // At the start of a text: ended by anything but a digit or a dot.
        let e = |c, s, d| Enhanced {
            class: c,
            subject: s,
            detail: d,
        };
        assert_eq!(Enhanced::parse_prefix(b"5.1.1 user"), Some((e(5, 1, 1), 5)));
        assert_eq!(Enhanced::parse_prefix(b"4.7.650"), Some((e(4, 7, 650), 7)));
        assert_eq!(Enhanced::parse_prefix(b"5.7.1;x"), Some((e(5, 7, 1), 5)));
        assert_eq!(Enhanced::parse_prefix(b"5.1.1x"), Some((e(5, 1, 1), 5)));
        for bad in ["5.1.1.2 x", "5.1.10000"] {
            assert_eq!(Enhanced::parse_prefix(bad.as_bytes()), None, "{bad}");
        }
        // The definition, spelled plainly: three dot-separated parts, 1-3 digits each after
        // the class. Every string over a small alphabet up to eight bytes agrees with it.
        let plain = |s: &str| -> Option<(u8, u16, u16)> {
            let mut it = s.splitn(3, '.');
            let (c, sj, d) = (it.next()?, it.next()?, it.next()?);
            let num = |p: &str| {
                (!p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse::<u16>().unwrap())
            };
            (c.len() == 1 && matches!(c.as_bytes()[0], b'2' | b'4' | b'5'))
                .then(|| (c.as_bytes()[0] - b'0', num(sj), num(d)))
                .and_then(|(c, sj, d)| Some((c, sj?, d?)))
        };
        let alphabet = [b'4', b'1', b'.', b'a'];
        let mut checked = 0;
        for len in 0..=8u32 {
            for mut code in 0..4usize.pow(len) {
                let mut s = Vec::new();
                for _ in 0..len {
                    s.push(alphabet[code % 4]);
                    code /= 4;
                }
                let s = String::from_utf8(s).unwrap();
                let got = Enhanced::parse(&s).map(|e| (e.class, e.subject, e.detail));
                assert_eq!(got, plain(&s), "{s}");
                checked += got.is_some() as usize;
            }
        }
        assert!(checked > 100);
    }
}
