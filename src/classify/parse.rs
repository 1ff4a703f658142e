//! Reply parsing: every shape an MTA reports a reply in → codes, text and context.
//!
//! Pure slicing over the input (`Parsed` borrows it); no allocation. The forms understood:
//! raw replies (`421 4.7.28 …`, `550-5.7.1 …`, multi-line continuations joined by a space or
//! by line breaks), Postfix log lines (`… dsn=4.7.28, status=deferred (host X[ip] said: …
//! (in reply to end of DATA command))`), the delivery-status-filter key (`4.7.28 host …
//! said: …`), DSN `Diagnostic-Code: smtp; …`, Exchange NDRs (`Remote Server returned '…'`),
//! Exim / qmail / Gmail bounce wrappers, and connection-level failures that carry no reply.

use super::types::{Enhanced, SmtpStage};

/// A [`Needle`] built at compile time.
macro_rules! ci {
    ($s:literal) => {{
        const N: Needle = Needle::new($s);
        &N
    }};
}

/// Replies longer than this are parsed on their first `MAX_REPLY_LEN` bytes only: real
/// replies are a few hundred bytes, and the bound keeps the per-reply cost bounded.
pub const MAX_REPLY_LEN: usize = 4096;

/// The outermost shape the reply arrived in (for `--explain`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Form {
    /// `550 5.1.1 text` or text without any code.
    #[default]
    Raw,
    /// A Postfix `status=…` log line.
    PostfixLog,
    /// The delivery-status-filter key: `X.Y.Z text`.
    StatusKey,
    /// A DSN `Diagnostic-Code:` field.
    Diagnostic,
    /// Exchange / Office 365 NDR text.
    ExchangeNdr,
    /// Another MTA's wrapper around the remote reply (Exim, qmail, Gmail bounce, …).
    Wrapped,
    /// No reply at all: connect / DNS / lost-connection failures.
    ConnectionFailure,
}

impl Form {
    pub const fn as_str(self) -> &'static str {
        match self {
            Form::Raw => "raw",
            Form::PostfixLog => "postfix_log",
            Form::StatusKey => "status_key",
            Form::Diagnostic => "diagnostic_code",
            Form::ExchangeNdr => "exchange_ndr",
            Form::Wrapped => "wrapped",
            Form::ConnectionFailure => "connection_failure",
        }
    }
}

/// The parts of one reply. `text` is the reply text after its codes, without the MTA's
/// wrapper; continuation codes of multi-line replies are still inside it (see
/// [`strip_continuations`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Parsed<'a> {
    pub form: Form,
    /// Base reply code (`421`), from the reply itself.
    pub code: Option<u16>,
    /// Enhanced status code written in the reply itself.
    pub enhanced: Option<Enhanced>,
    /// Enhanced status the MTA attached (status-filter key prefix, log `dsn=`).
    pub status: Option<Enhanced>,
    pub text: &'a str,
    pub mx_host: Option<&'a str>,
    pub mx_ip: Option<&'a str>,
    pub stage: Option<SmtpStage>,
    pub recipient: Option<&'a str>,
}

impl Parsed<'_> {
    /// The reply's own enhanced code, else the one the MTA attached.
    pub fn effective_enhanced(&self) -> Option<Enhanced> {
        self.enhanced.or(self.status)
    }
}

/// Parses one reply in any of the supported forms.
pub fn parse(input: &str) -> Parsed<'_> {
    let mut s = bounded(input).trim_ascii();
    let mut p = Parsed::default();

    if let Some(inner) = postfix_log(s, &mut p) {
        s = inner;
    }
    if let Some(rest) = strip_prefix_ci(s, "Diagnostic-Code:") {
        p.form = outer(p.form, Form::Diagnostic);
        s = rest.trim_ascii_start();
        // `smtp; 550 …`, `X-Postfix; …`: the type is one token before the semicolon.
        if let Some(semi) = find_byte(s, b';') {
            if semi > 0 && semi < 16 && find_byte(&s[..semi], b' ').is_none() {
                s = s[semi + 1..].trim_ascii_start();
            }
        }
    }
    // Status-filter key: an enhanced code, then the text Postfix logs in parentheses.
    if let Some((e, rest)) = leading_enhanced(s) {
        if p.status.is_none() {
            p.status = Some(e);
        }
        p.form = outer(p.form, Form::StatusKey);
        s = rest;
    }
    if let Some(rest) = strip_prefix_ci(s, "delivery temporarily suspended: ") {
        s = rest;
    }
    s = unwrap(s, &mut p);
    s = strip_in_reply_to(s, &mut p);

    let (code, enhanced, rest) = leading_codes(s);
    if code.is_some() || enhanced.is_some() {
        p.code = code;
        p.enhanced = enhanced;
        s = rest;
    } else if p.form != Form::ConnectionFailure {
        if let Some((code, enhanced, rest)) = embedded_reply(s) {
            p.code = Some(code);
            p.enhanced = enhanced;
            s = rest;
        } else if let Some(e) = qmail_status(s) {
            p.enhanced = Some(e);
        }
    }
    p.text = s.trim_ascii();
    p
}

/// Keeps the outermost form once one is set.
fn outer(current: Form, next: Form) -> Form {
    if current == Form::Raw {
        next
    } else {
        current
    }
}

fn bounded(s: &str) -> &str {
    if s.len() <= MAX_REPLY_LEN {
        return s;
    }
    let mut end = MAX_REPLY_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A Postfix delivery log line: fills recipient, relay, dsn and returns the text in the
/// parentheses after `status=…`.
fn postfix_log<'a>(s: &'a str, p: &mut Parsed<'a>) -> Option<&'a str> {
    // Most replies hold no `=` at all: one plain scan decides.
    memchr::memchr(b'=', s.as_bytes())?;
    let at = find_ci(s, ci!("status="))?;
    if at > 0 && !matches!(s.as_bytes()[at - 1], b' ' | b',') {
        return None;
    }
    let head = &s[..at];
    let after = &s[at + "status=".len()..];
    let open = find_byte(after, b'(')?;
    let close = rfind_byte(after, b')')?;
    if close <= open {
        return None;
    }
    p.form = Form::PostfixLog;
    if let Some(i) = find_ci(head, ci!("to=<")) {
        let r = &head[i + 4..];
        p.recipient = find_byte(r, b'>')
            .map(|j| &r[..j])
            .filter(|r| !r.is_empty());
    }
    if let Some(i) = find_ci(head, ci!("relay=")) {
        let r = &head[i + 6..];
        let r = &r[..find_byte(r, b',').unwrap_or(r.len())];
        if r != "none" {
            let (host, ip) = host_ip(r);
            p.mx_host = host;
            p.mx_ip = ip;
        }
    }
    if let Some(i) = find_ci(head, ci!("dsn=")) {
        let r = &head[i + 4..];
        p.status = Enhanced::parse(&r[..find_byte(r, b',').unwrap_or(r.len())]);
    }
    Some(&after[open + 1..close])
}

/// `name[ip]` or `name[ip]:port` or `name` → (name, ip).
fn host_ip(s: &str) -> (Option<&str>, Option<&str>) {
    let s = s.trim_ascii();
    match find_byte(s, b'[') {
        Some(i) => {
            let host = s[..i].trim_ascii();
            let rest = &s[i + 1..];
            let ip = find_byte(rest, b']').map(|j| &rest[..j]);
            (
                Some(host).filter(|h| !h.is_empty()),
                ip.filter(|i| !i.is_empty()),
            )
        }
        None => (
            Some(s).filter(|h| !h.is_empty() && find_byte(h, b' ').is_none()),
            None,
        ),
    }
}

/// Strips known MTA wrappers around the remote reply, recording context.
fn unwrap<'a>(mut s: &'a str, p: &mut Parsed<'a>) -> &'a str {
    // A reply that starts with its code carries no wrapper (the common, hot case).
    if base_code(s.strip_prefix('#').unwrap_or(s)).is_some() {
        return s;
    }
    // Postfix smtp(8) forms.
    if let Some(rest) = strip_prefix_ci(s, "host ") {
        if let Some(i) = find_ci(rest, ci!(" said:")) {
            set_host(p, &rest[..i]);
            return rest[i + 6..].trim_ascii_start();
        }
        if let Some(i) = find_ci(rest, ci!(" refused to talk to me:")) {
            set_host(p, &rest[..i]);
            p.stage = Some(SmtpStage::Greeting);
            return rest[i + " refused to talk to me:".len()..].trim_ascii_start();
        }
    }
    if let Some(rest) = strip_prefix_ci(s, "connect to ") {
        if let Some(i) = find_ci(rest, ci!(": ")) {
            set_host(p, strip_port(&rest[..i]));
        }
        p.stage = Some(SmtpStage::Connect);
        p.form = outer(p.form, Form::ConnectionFailure);
        return s;
    }
    for lead in ["conversation with ", "lost connection with "] {
        if let Some(rest) = strip_prefix_ci(s, lead) {
            let end = find_byte(rest, b' ').unwrap_or(rest.len());
            set_host(p, &rest[..end]);
            p.stage = find_ci(rest, ci!(" while ")).and_then(|i| stage_of(&rest[i..]));
            p.form = outer(p.form, Form::ConnectionFailure);
            return s;
        }
    }
    if starts_with_ci(s, "Host or domain name not found")
        || starts_with_ci(s, "unable to look up host")
        || starts_with_ci(s, "Name service error")
    {
        p.stage = Some(SmtpStage::Connect);
        p.form = outer(p.form, Form::ConnectionFailure);
        return s;
    }
    // Exchange NDR: `Remote Server returned '550 5.1.1 …'` (older: `'<host #5.0.0 smtp;550 …>'`).
    if let Some(i) = find_ci(s, ci!("Remote Server returned '")) {
        let inner = &s[i + "Remote Server returned '".len()..];
        let inner = &inner[..rfind_byte(inner, b'\'').unwrap_or(inner.len())];
        p.form = outer(p.form, Form::ExchangeNdr);
        let inner = match (inner.starts_with('<'), find_ci(inner, ci!("smtp;"))) {
            (true, Some(j)) => inner[j + 5..].trim_end_matches('>'),
            _ => inner,
        };
        return inner.trim_ascii();
    }
    // Exim: `[host NAME [IP] ]SMTP error from remote mail(er|server) after CMD: [host NAME [IP]: ]REPLY`.
    if let Some(i) = find_ci(s, ci!("SMTP error from remote mail")) {
        if let Some(h) = find_ci(&s[..i], ci!("host ")) {
            let before = s[h + 5..i].trim_ascii();
            let end = find_ci(before, ci!("] "))
                .map(|e| e + 1)
                .unwrap_or(before.len());
            set_host_spaced(p, &before[..end]);
        }
        let rest = &s[i..];
        if let Some(a) = find_ci(rest, ci!(" after ")) {
            let cmd_and_reply = &rest[a + 7..];
            let colon = colon_space_not_addr(cmd_and_reply);
            let cmd = &cmd_and_reply[..colon.unwrap_or(cmd_and_reply.len())];
            p.stage = stage_of(cmd);
            if p.stage == Some(SmtpStage::RcptTo) {
                p.recipient = angle(cmd);
            }
            p.form = outer(p.form, Form::Wrapped);
            if let Some(c) = colon {
                s = cmd_and_reply[c + 1..].trim_ascii_start();
                if let Some(r) = strip_prefix_ci(s, "host ") {
                    if let Some(j) = find_ci(r, ci!("]: ")) {
                        set_host_spaced(p, &r[..j + 1]);
                        s = &r[j + 3..];
                    }
                }
                return s;
            }
        }
    }
    // qmail: `IP does not like recipient. Remote host said: …`.
    if let Some(i) = find_ci(s, ci!("Remote host said:")) {
        let head = &s[..i];
        p.stage = if find_ci(head, ci!("does not like recipient")).is_some() {
            Some(SmtpStage::RcptTo)
        } else if find_ci(head, ci!("sender was rejected")).is_some() {
            Some(SmtpStage::MailFrom)
        } else if find_ci(head, ci!("my name was rejected")).is_some() {
            Some(SmtpStage::Helo)
        } else if find_ci(head, ci!("after I sent the message")).is_some() {
            Some(SmtpStage::EndOfData)
        } else {
            p.stage
        };
        p.form = outer(p.form, Form::Wrapped);
        return s[i + "Remote host said:".len()..].trim_ascii_start();
    }
    // `NAME [IP] did not like our RCPT TO:550 …`.
    if let Some(i) = find_ci(s, ci!(" did not like our ")) {
        let head = &s[..i];
        set_host_spaced(
            p,
            rfind_ci(head, ci!(": ")).map_or(head, |j| &head[j + 2..]),
        );
        let rest = &s[i + " did not like our ".len()..];
        let colon = find_byte(rest, b':').unwrap_or(rest.len());
        p.stage = stage_of(&rest[..colon]);
        p.form = outer(p.form, Form::Wrapped);
        return rest.get(colon + 1..).unwrap_or("").trim_ascii_start();
    }
    // Gmail's own bounce and other DSN prose: the remote text follows a fixed phrase.
    if let Some(end) = after_lead(s) {
        p.form = outer(p.form, Form::Wrapped);
        return s[end..].trim_ascii_start().trim_start_matches('[');
    }
    s
}

/// Phrases after which DSN prose quotes the remote reply, in order of preference. Each ends
/// with `:`, so one pass over the colons finds them all.
const LEADS: [&[u8]; 5] = [
    b"The error that the other server returned was:",
    b"The response from the remote server was:",
    b"The response was:",
    b"It responded as follows:",
    b"Reported error:",
];

/// The end of the first occurrence of the most preferred of [`LEADS`] that occurs in `s`.
fn after_lead(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut found = [None; LEADS.len()];
    for colon in memchr::memchr_iter(b':', b) {
        let end = colon + 1;
        for (k, lead) in LEADS.iter().enumerate() {
            if found[k].is_none() && end >= lead.len() && starts_ci(&b[end - lead.len()..end], lead)
            {
                found[k] = Some(end);
            }
        }
        if found[0].is_some() {
            break;
        }
    }
    found.into_iter().flatten().next()
}

/// `name[ip]` (Postfix) into the context.
fn set_host<'a>(p: &mut Parsed<'a>, s: &'a str) {
    let (host, ip) = host_ip(s);
    if p.mx_host.is_none() {
        p.mx_host = host;
    }
    if p.mx_ip.is_none() {
        p.mx_ip = ip;
    }
}

/// `name [ip]` (Exim, with a space) into the context.
fn set_host_spaced<'a>(p: &mut Parsed<'a>, s: &'a str) {
    let s = s.trim_ascii();
    match find_ci(s, ci!(" [")) {
        Some(i) => {
            let ip = &s[i + 2..];
            let ip = &ip[..find_byte(ip, b']').unwrap_or(ip.len())];
            if p.mx_host.is_none() && find_byte(&s[..i], b' ').is_none() {
                p.mx_host = Some(&s[..i]).filter(|h| !h.is_empty());
            }
            if p.mx_ip.is_none() {
                p.mx_ip = Some(ip).filter(|i| !i.is_empty());
            }
        }
        None => set_host(p, s),
    }
}

fn strip_port(s: &str) -> &str {
    match rfind_ci(s, ci!("]:")) {
        Some(i) => &s[..i + 1],
        None => s,
    }
}

/// The first `: ` that ends an Exim command (not the `:` of `RCPT TO:<addr>`).
fn colon_space_not_addr(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b':' && b[i + 1] == b' ' && b.get(i + 2) != Some(&b'<') {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn angle(s: &str) -> Option<&str> {
    let i = find_byte(s, b'<')?;
    let r = &s[i + 1..];
    let j = find_byte(r, b'>')?;
    Some(&r[..j]).filter(|a| !a.is_empty())
}

/// Removes Postfix's `(in reply to X command)` trailer, recording the stage.
fn strip_in_reply_to<'a>(s: &'a str, p: &mut Parsed<'a>) -> &'a str {
    let t = s.trim_ascii_end();
    if !t.ends_with(')') {
        return s;
    }
    if let Some(i) = rfind_ci(t, ci!("(in reply to ")) {
        if let Some(stage) = stage_of(&t[i..]) {
            p.stage = Some(stage);
        }
        return t[..i].trim_ascii_end();
    }
    s
}

/// Commands as they lead Postfix's `(in reply to X command)`, Exim's `after X:` and qmail's
/// `did not like our X:`, longest first where one starts another.
const COMMANDS: [(&[u8], SmtpStage); 8] = [
    (b"end of data", SmtpStage::EndOfData),
    (b"rcpt", SmtpStage::RcptTo),
    (b"mail from", SmtpStage::MailFrom),
    (b"data", SmtpStage::Data),
    (b"helo", SmtpStage::Helo),
    (b"ehlo", SmtpStage::Helo),
    (b"starttls", SmtpStage::StartTls),
    (b"quit", SmtpStage::Quit),
];

/// The stage of the command `s` starts with (after an optional `(in reply to `), when a
/// known command is followed by a non-letter or the end.
fn leading_command(s: &str) -> Option<SmtpStage> {
    let s = strip_prefix_ci(s, "(in reply to ").unwrap_or(s).as_bytes();
    COMMANDS.iter().find_map(|&(cmd, stage)| {
        (starts_ci(s, cmd) && !s.get(cmd.len()).is_some_and(|b| b.is_ascii_alphabetic()))
            .then_some(stage)
    })
}

/// The SMTP stage a command name or Postfix activity phrase refers to: the command it
/// starts with, else the first known phrase anywhere in it.
pub fn stage_of(s: &str) -> Option<SmtpStage> {
    leading_command(s).or_else(|| stage_in(s))
}

/// The SMTP stage a phrase anywhere in `s` names.
fn stage_in(s: &str) -> Option<SmtpStage> {
    // Order matters: "end of DATA" before "DATA", "MAIL FROM" before "HELO" (rare mix).
    if find_ci(s, ci!("end of data")).is_some()
        || find_ci(s, ci!("final data")).is_some()
        || find_ci(s, ci!("sending end of data")).is_some()
    {
        return Some(SmtpStage::EndOfData);
    }
    if find_ci(s, ci!("RCPT")).is_some() {
        return Some(SmtpStage::RcptTo);
    }
    if find_ci(s, ci!("MAIL FROM")).is_some() {
        return Some(SmtpStage::MailFrom);
    }
    if find_ci(s, ci!("initial server greeting")).is_some()
        || find_ci(s, ci!("initial connection")).is_some()
    {
        return Some(SmtpStage::Greeting);
    }
    if find_ci(s, ci!("HELO")).is_some() || find_ci(s, ci!("EHLO")).is_some() {
        return Some(SmtpStage::Helo);
    }
    if find_ci(s, ci!("STARTTLS")).is_some() || find_ci(s, ci!("TLS negotiation")).is_some() {
        return Some(SmtpStage::StartTls);
    }
    if find_ci(s, ci!("DATA")).is_some() || find_ci(s, ci!("message body")).is_some() {
        return Some(SmtpStage::Data);
    }
    if find_ci(s, ci!("QUIT")).is_some() {
        return Some(SmtpStage::Quit);
    }
    None
}

/// `X.Y.Z ` at the start (the status-filter key) → (code, rest). The rest must be non-empty.
fn leading_enhanced(s: &str) -> Option<(Enhanced, &str)> {
    let (e, end) = Enhanced::parse_prefix(s.as_bytes())?;
    if s.as_bytes().get(end) != Some(&b' ') {
        return None;
    }
    let rest = s[end + 1..].trim_ascii_start();
    if rest.is_empty() {
        None
    } else {
        Some((e, rest))
    }
}

/// Parses `550 5.1.1 `, `550-5.7.1 `, `#550 5.2.3 `, `550: 5.1.1 `, `550 #5.1.0 `,
/// `550-'5.7.1 ` at the start of `s`; returns what was found and the rest.
fn leading_codes(s: &str) -> (Option<u16>, Option<Enhanced>, &str) {
    let t = if s.as_bytes().first() == Some(&b'#') {
        &s[1..]
    } else {
        s
    };
    let Some((code, mut rest)) = base_code(t) else {
        return (None, None, s);
    };
    rest = skip_bytes(rest, |b| matches!(b, b' ' | b'-' | b':'));
    let r = skip_bytes(rest, |b| matches!(b, b'#' | b'\''));
    let enhanced = match Enhanced::parse_prefix(r.as_bytes()) {
        Some((e, n)) if e.class as u16 == code / 100 => {
            rest = &r[n..];
            Some(e)
        }
        _ => None,
    };
    (
        Some(code),
        enhanced,
        skip_bytes(rest, |b| matches!(b, b' ' | b'-')),
    )
}

/// `s` without its leading bytes from `set` (ASCII, so the cut is a character boundary).
#[inline]
fn skip_bytes(s: &str, skip: impl Fn(u8) -> bool) -> &str {
    let b = s.as_bytes();
    let mut n = 0;
    while n < b.len() && skip(b[n]) {
        n += 1;
    }
    &s[n..]
}

/// `[245]\d\d` followed by a space, `-`, `:` or the end.
fn base_code(s: &str) -> Option<(u16, &str)> {
    let b = s.as_bytes();
    if b.len() < 3
        || !matches!(b[0], b'2' | b'4' | b'5')
        || !b[1].is_ascii_digit()
        || !b[2].is_ascii_digit()
    {
        return None;
    }
    if b.len() > 3 && !matches!(b[3], b' ' | b'-' | b':' | b'\r' | b'\n') {
        return None;
    }
    let code = (b[0] - b'0') as u16 * 100 + (b[1] - b'0') as u16 * 10 + (b[2] - b'0') as u16;
    Some((code, &s[3..]))
}

/// A reply embedded after some prose (`User unknown: 550 Requested …`, `Remote protocol
/// error: 550 …`): a code at a token start, after `: ` or a quote, followed by a letter or an
/// enhanced code. Only searched in the first part of the text.
fn embedded_reply(s: &str) -> Option<(u16, Option<Enhanced>, &str)> {
    let b = s.as_bytes();
    let limit = b.len().min(400);
    let mut i = 1;
    while i + 4 < limit {
        // Skip to the next 4 or 5: most of the text holds none.
        match memchr::memchr2(b'4', b'5', &b[i..limit - 4]) {
            Some(k) => i += k,
            None => break,
        }
        if matches!(b[i - 1], b' ' | b'\'' | b'"' | b'[' | b'(')
            && (i < 2 || matches!(b[i - 2], b':' | b' ' | b'\'' | b'"' | b'['))
        {
            let (code, enhanced, rest) = leading_codes(&s[i..]);
            if let Some(code) = code {
                let follows_well = enhanced.is_some()
                    || rest
                        .as_bytes()
                        .first()
                        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'<');
                let after_colon = b[..i].trim_ascii_end().ends_with(b":");
                if follows_well && (after_colon || enhanced.is_some()) {
                    return Some((code, enhanced, rest));
                }
            }
        }
        i += 1;
    }
    None
}

/// qmail's `(#5.1.1)` status at the end of its prose.
fn qmail_status(s: &str) -> Option<Enhanced> {
    let b = s.as_bytes();
    let mut from = 1;
    let i = loop {
        let j = from + memchr::memchr(b'#', b.get(from..)?)?;
        if b[j - 1] == b'(' {
            break j - 1;
        }
        from = j + 1;
    };
    let r = &s[i + 2..];
    let j = find_byte(r, b')')?;
    Enhanced::parse(&r[..j])
}

fn code_digits(c: u16) -> [u8; 3] {
    [
        b'0' + (c / 100 % 10) as u8,
        b'0' + (c / 10 % 10) as u8,
        b'0' + (c % 10) as u8,
    ]
}

/// Whether [`strip_continuations`] would change `text`: line breaks, or the base code
/// repeated after a space.
pub fn needs_strip(text: &str, code: Option<u16>) -> bool {
    let b = text.as_bytes();
    let Some(cb) = code.map(code_digits) else {
        return memchr::memchr2(b'\n', b'\r', b).is_some();
    };
    // One pass over line breaks and the code's first digit: ` DDD ` or ` DDD-`.
    for i in memchr::memchr3_iter(b'\n', b'\r', cb[0], b) {
        if b[i] != cb[0] {
            return true;
        }
        if i > 0
            && i + 4 <= b.len()
            && b[i - 1] == b' '
            && b[i + 1..i + 3] == cb[1..]
            && matches!(b[i + 3], b' ' | b'-')
        {
            return true;
        }
    }
    false
}

/// Rewrites multi-line replies for matching: continuation codes (`421-4.7.28`, or the same
/// base code repeated after a line break or a joining space) and line breaks become single
/// spaces, so a phrase split across lines still reads as one. Returns `text` itself when
/// there is nothing to strip (the common case); otherwise writes into `buf`.
pub fn strip_continuations<'b>(
    text: &'b str,
    code: Option<u16>,
    enhanced: Option<Enhanced>,
    buf: &'b mut [u8],
) -> &'b str {
    if needs_strip(text, code) {
        rewrite_continuations(text, code, enhanced, buf)
    } else {
        text
    }
}

/// [`strip_continuations`] of a text [`needs_strip`] has already said yes to (the hot path
/// asks first, to know whether it needs a buffer at all).
pub(crate) fn rewrite_continuations<'b>(
    text: &str,
    code: Option<u16>,
    enhanced: Option<Enhanced>,
    buf: &'b mut [u8],
) -> &'b str {
    let b = text.as_bytes();
    let code_bytes = code.map(code_digits);
    let mut out = 0;
    let mut i = 0;
    let cap = buf.len();
    while i < b.len() && out < cap {
        let c = b[i];
        let at_break = c == b' ' || c == b'\n' || c == b'\r';
        if at_break {
            // Collapse the whitespace run, then drop a repeated code after it.
            let mut j = i;
            while j < b.len() && matches!(b[j], b' ' | b'\n' | b'\r' | b'\t') {
                j += 1;
            }
            if let Some(cb) = code_bytes {
                if b.len() >= j + 4 && b[j..j + 3] == cb && matches!(b[j + 3], b' ' | b'-') {
                    let mut k = j + 4;
                    if let Some(e) = enhanced {
                        if let Some((found, n)) = Enhanced::parse_prefix(&b[k..]) {
                            if found == e {
                                k += n;
                            }
                        }
                    }
                    while k < b.len() && b[k] == b' ' {
                        k += 1;
                    }
                    j = k;
                }
            }
            if out > 0 {
                buf[out] = b' ';
                out += 1;
            }
            i = j;
            continue;
        }
        buf[out] = c;
        out += 1;
        i += 1;
    }
    // Never cut a character in half when the buffer filled up.
    let mut end = out;
    while end > 0 && std::str::from_utf8(&buf[..end]).is_err() {
        end -= 1;
    }
    std::str::from_utf8(&buf[..end]).unwrap_or("")
}

/// The first `b` in `s`. `str::find` with a `char` or `&str` pattern pays for a general
/// searcher on every call; these texts are short and the patterns one ASCII byte.
#[inline]
fn find_byte(s: &str, b: u8) -> Option<usize> {
    memchr::memchr(b, s.as_bytes())
}

/// The last `b` in `s`.
#[inline]
fn rfind_byte(s: &str, b: u8) -> Option<usize> {
    memchr::memrchr(b, s.as_bytes())
}

pub(crate) fn starts_with_ci(s: &str, prefix: &str) -> bool {
    starts_ci(s.as_bytes(), prefix.as_bytes())
}

/// Whether `s` starts with `p`, ASCII case-insensitively.
#[inline]
fn starts_ci(s: &[u8], p: &[u8]) -> bool {
    // Most tries fail at the first byte: decide those without the slice compare.
    match (s.first(), p.first()) {
        (_, None) => true,
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) && s.len() >= p.len() => {
            s[..p.len()].eq_ignore_ascii_case(p)
        }
        _ => false,
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if starts_with_ci(s, prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// A needle for [`find_ci`] / [`rfind_ci`] (ASCII), with the byte to skip to chosen when it
/// is compiled: the rarest one in typical reply text (`=`, `'`, `:` or an uncommon letter)
/// rather than the first, so a miss costs one `memchr` pass instead of stopping at every
/// `s`, `r` or `t` of the reply. Build one with [`ci!`].
pub(crate) struct Needle {
    bytes: &'static [u8],
    /// Index of the byte `memchr` looks for.
    rare: usize,
}

impl Needle {
    pub(crate) const fn new(s: &'static str) -> Needle {
        let bytes = s.as_bytes();
        let mut rare = 0;
        let mut i = 1;
        while i < bytes.len() {
            if commonness(bytes[i]) < commonness(bytes[rare]) {
                rare = i;
            }
            i += 1;
        }
        Needle { bytes, rare }
    }
}

/// How common a byte is in SMTP reply text (higher = more common; about twice its share
/// in per mille of the public bounce corpus); only the order matters.
const fn commonness(b: u8) -> u8 {
    match b.to_ascii_lowercase() {
        b' ' => 255,
        b'e' => 200,
        b'o' => 140,
        b't' => 120,
        b'i' | b'r' => 115,
        b'a' => 112,
        b'n' | b's' | b'.' => 105,
        b'm' => 76,
        b'l' | b'p' | b'd' => 64,
        b'c' => 56,
        b'u' => 44,
        b'0'..=b'9' | b'h' => 30,
        b'g' => 25,
        b':' | b'f' => 23,
        b'k' | b'b' | b'x' => 20,
        b'-' => 18,
        b'/' | b'y' | b'j' => 15,
        b'v' | b'w' => 13,
        b'@' => 8,
        b',' | b'z' | b'q' | b'\'' => 3,
        b'=' | b';' | b'#' => 2,
        _ => 5,
    }
}

impl Needle {
    /// The byte to skip to, in both cases.
    #[inline(always)]
    fn rare_pair(&self) -> (u8, u8) {
        let b = self.bytes[self.rare];
        (b.to_ascii_lowercase(), b.to_ascii_uppercase())
    }
}

/// ASCII case-insensitive substring search: the first occurrence. Skips to candidates with
/// `memchr` on the needle's rarest byte, so a miss over a few hundred bytes costs a few
/// dozen instructions.
pub(crate) fn find_ci(hay: &str, needle: &Needle) -> Option<usize> {
    let h = hay.as_bytes();
    let n = needle.bytes;
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    let k = needle.rare;
    let (lo, up) = needle.rare_pair();
    // The rare byte of a match at `i` sits at `i + k`, for `i` in `0..=h.len() - n.len()`.
    let end = h.len() - n.len() + k;
    let mut from = k;
    while from <= end {
        let window = &h[from..=end];
        let j = from
            + if lo == up {
                memchr::memchr(lo, window)?
            } else {
                memchr::memchr2(lo, up, window)?
            };
        let i = j - k;
        if starts_ci(&h[i..], n) {
            return Some(i);
        }
        from = j + 1;
    }
    None
}

/// Like [`find_ci`], the last occurrence.
fn rfind_ci(hay: &str, needle: &Needle) -> Option<usize> {
    let h = hay.as_bytes();
    let n = needle.bytes;
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    let k = needle.rare;
    let (lo, up) = needle.rare_pair();
    let mut end = h.len() - n.len() + k;
    loop {
        let window = &h[k..=end];
        let j = k + if lo == up {
            memchr::memrchr(lo, window)?
        } else {
            memchr::memrchr2(lo, up, window)?
        };
        let i = j - k;
        if starts_ci(&h[i..], n) {
            return Some(i);
        }
        if j == k {
            return None;
        }
        end = j - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SmtpStage::*;

    #[test]
    fn stage_from_the_leading_command_else_a_phrase() {
        let cases: &[(&str, Option<SmtpStage>)] = &[
            ("(in reply to end of DATA command)", Some(EndOfData)),
            ("(in reply to RCPT TO command)", Some(RcptTo)),
            ("(IN REPLY TO data command)", Some(Data)),
            ("(in reply to MAIL FROM command)", Some(MailFrom)),
            ("(in reply to EHLO command)", Some(Helo)),
            // The command decides over a phrase inside the address.
            ("RCPT TO:<end-of-data@example.com>", Some(RcptTo)),
            ("MAIL FROM:<data@example.com>", Some(MailFrom)),
            // Not a command word: the phrase search.
            ("database error after end of data", Some(EndOfData)),
            (
                " while receiving the initial server greeting",
                Some(Greeting),
            ),
            (" while performing the TLS negotiation", Some(StartTls)),
            ("(in reply to unknown command)", None),
        ];
        for &(s, want) in cases {
            assert_eq!(stage_of(s), want, "{s}");
        }
    }

    #[test]
    fn case_insensitive_prefix() {
        for (s, prefix, want) in [
            ("Host or domain", "host ", true),
            ("HOST", "host", true),
            ("hos", "host", false),
            ("ghost", "host", false),
            ("hast", "host", false),
            ("", "", true),
            ("x", "", true),
            ("", "x", false),
        ] {
            assert_eq!(starts_with_ci(s, prefix), want, "{s:?} {prefix:?}");
        }
    }

    #[test]
    fn case_insensitive_search() {
        // (haystack, needle, first, last)
        let cases: &[(&str, &'static str, Option<usize>, Option<usize>)] = &[
            ("host x said: 550", " said:", Some(6), Some(6)),
            ("host x SAID: 550 said: 1", " said:", Some(6), Some(16)),
            ("RCPT rcpt", "rcpt", Some(0), Some(5)),
            ("xxrcp", "rcpt", None, None),
            ("rcpt", "rcpt", Some(0), Some(0)),
            ("rcp", "rcpt", None, None),
            ("", "a", None, None),
            ("abc", "", None, None),
            (
                "ab (in reply to (in reply to",
                "(in reply to ",
                Some(3),
                Some(3),
            ),
            (
                "ab (in reply to (IN REPLY TO x",
                "(in reply to ",
                Some(3),
                Some(16),
            ),
            ("--::", "::", Some(2), Some(2)),
            ("a::", "::", Some(1), Some(1)),
            ("é said: x", " said:", Some(2), Some(2)),
        ];
        for &(hay, text, first, last) in cases {
            let needle = Needle::new(text);
            assert_eq!(find_ci(hay, &needle), first, "find {text:?} in {hay:?}");
            assert_eq!(rfind_ci(hay, &needle), last, "rfind {text:?} in {hay:?}");
        }
    }

    fn e(s: &str) -> Option<Enhanced> {
        Enhanced::parse(s)
    }

    struct Case {
        input: &'static str,
        form: Form,
        code: Option<u16>,
        enhanced: &'static str,
        status: &'static str,
        text: &'static str,
        host: Option<&'static str>,
        ip: Option<&'static str>,
        stage: Option<SmtpStage>,
        rcpt: Option<&'static str>,
    }

    const NO: Case = Case {
        input: "",
        form: Form::Raw,
        code: None,
        enhanced: "",
        status: "",
        text: "",
        host: None,
        ip: None,
        stage: None,
        rcpt: None,
    };

    #[test]
    fn reply_forms() {
        let cases = [
            Case { input: "421 4.7.28 Gmail has detected", code: Some(421), enhanced: "4.7.28", text: "Gmail has detected", ..NO },
            Case { input: "550-5.7.1 [203.0.113.7] Our system has detected", code: Some(550), enhanced: "5.7.1", text: "[203.0.113.7] Our system has detected", ..NO },
            Case { input: "554 Message not allowed - [TS03]", code: Some(554), text: "Message not allowed - [TS03]", ..NO },
            Case { input: "#550 5.2.3 RESOLVER.RST.RecipSizeLimit; message too large ##", code: Some(550), enhanced: "5.2.3", text: "RESOLVER.RST.RecipSizeLimit; message too large ##", ..NO },
            Case { input: "550: 5.1.1 <u@x.jp>... User Unknown", code: Some(550), enhanced: "5.1.1", text: "<u@x.jp>... User Unknown", ..NO },
            Case { input: "550 #5.1.0 Address rejected x@y", code: Some(550), enhanced: "5.1.0", text: "Address rejected x@y", ..NO },
            Case { input: "503 Improper sequence of commands", code: Some(503), text: "Improper sequence of commands", ..NO },
            Case { input: "Over quota", text: "Over quota", ..NO },
            Case {
                input: "Dec  1 10:00:00 vm postfix/smtp[1]: 8593C98C123: to=<user@gmail.test>, relay=gmail-smtp-in.l.google.com[142.250.1.27]:25, delay=2.7, delays=2.7/0/0/0, dsn=4.7.28, status=deferred (host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected an unusual rate 421 4.7.28 originating from your IP address. (in reply to end of DATA command))",
                form: Form::PostfixLog, code: Some(421), enhanced: "4.7.28", status: "4.7.28",
                text: "Gmail has detected an unusual rate 421 4.7.28 originating from your IP address.",
                host: Some("gmail-smtp-in.l.google.com"), ip: Some("142.250.1.27"), stage: Some(EndOfData), rcpt: Some("user@gmail.test"),
            },
            Case {
                input: "postfix/smtp[11803]: 3840B98C0E2: to=<user@refused.test>, relay=none, delay=0.01, delays=0/0/0/0, dsn=4.4.1, status=deferred (connect to 127.0.0.9[127.0.0.9]:2525: Connection refused)",
                form: Form::PostfixLog, status: "4.4.1", text: "connect to 127.0.0.9[127.0.0.9]:2525: Connection refused",
                host: Some("127.0.0.9"), ip: Some("127.0.0.9"), stage: Some(Connect), rcpt: Some("user@refused.test"), ..NO
            },
            Case {
                input: "4.7.28 host 127.0.0.2[127.0.0.2] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later. (in reply to RCPT TO command)",
                form: Form::StatusKey, code: Some(421), enhanced: "4.7.28", status: "4.7.28",
                text: "Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later.",
                host: Some("127.0.0.2"), ip: Some("127.0.0.2"), stage: Some(RcptTo), ..NO
            },
            Case { input: "2.0.0 250 2.0.0 Ok: queued", form: Form::StatusKey, code: Some(250), enhanced: "2.0.0", status: "2.0.0", text: "Ok: queued", ..NO },
            Case { input: "5.1.1 <shironeko@example.jp>... User Unknown", form: Form::StatusKey, status: "5.1.1", text: "<shironeko@example.jp>... User Unknown", ..NO },
            Case {
                input: "4.4.2 conversation with 127.0.0.4[127.0.0.4] timed out while receiving the initial server greeting",
                form: Form::StatusKey, status: "4.4.2", text: "conversation with 127.0.0.4[127.0.0.4] timed out while receiving the initial server greeting",
                host: Some("127.0.0.4"), ip: Some("127.0.0.4"), stage: Some(Greeting), ..NO
            },
            Case {
                input: "4.3.2 host 127.0.0.3[127.0.0.3] refused to talk to me: 421 4.3.2 Service not available, closing transmission channel",
                form: Form::StatusKey, code: Some(421), enhanced: "4.3.2", status: "4.3.2", text: "Service not available, closing transmission channel",
                host: Some("127.0.0.3"), ip: Some("127.0.0.3"), stage: Some(Greeting), ..NO
            },
            Case {
                input: "4.4.2 lost connection with 127.0.0.2[127.0.0.2] while sending RCPT TO",
                form: Form::StatusKey, status: "4.4.2", text: "lost connection with 127.0.0.2[127.0.0.2] while sending RCPT TO",
                host: Some("127.0.0.2"), ip: Some("127.0.0.2"), stage: Some(RcptTo), ..NO
            },
            Case {
                input: "5.4.4 unable to look up host nohop.test: Name or service not known",
                form: Form::StatusKey, status: "5.4.4", text: "unable to look up host nohop.test: Name or service not known", stage: Some(Connect), ..NO
            },
            Case {
                input: "Host or domain name not found. Name service error for name=example.invalid type=MX: Host not found",
                form: Form::ConnectionFailure, text: "Host or domain name not found. Name service error for name=example.invalid type=MX: Host not found", stage: Some(Connect), ..NO
            },
            Case {
                input: "delivery temporarily suspended: lost connection with 127.0.0.6[127.0.0.6] while receiving the initial server greeting",
                form: Form::ConnectionFailure, text: "lost connection with 127.0.0.6[127.0.0.6] while receiving the initial server greeting",
                host: Some("127.0.0.6"), ip: Some("127.0.0.6"), stage: Some(Greeting), ..NO
            },
            Case { input: "Diagnostic-Code: smtp; 550 5.1.1 <u@x.org>... User unknown", form: Form::Diagnostic, code: Some(550), enhanced: "5.1.1", text: "<u@x.org>... User unknown", ..NO },
            Case {
                input: "Diagnostic information for administrators: k@example.com Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'",
                form: Form::ExchangeNdr, code: Some(550), enhanced: "5.1.1", text: "RESOLVER.ADR.RecipNotFound; not found", ..NO
            },
            Case {
                input: "Remote Server returned '<mx.example.com #5.0.0 smtp;550 5.1.1 User unknown>'",
                form: Form::ExchangeNdr, code: Some(550), enhanced: "5.1.1", text: "User unknown", ..NO
            },
            Case {
                input: "SMTP error from remote mail server after RCPT TO:<kijitora@example.jp>: host mx.example.jp [192.0.2.153]: 550 5.1.1 <kijitora@example.jp>... User Unknown",
                form: Form::Wrapped, code: Some(550), enhanced: "5.1.1", text: "<kijitora@example.jp>... User Unknown",
                host: Some("mx.example.jp"), ip: Some("192.0.2.153"), stage: Some(RcptTo), rcpt: Some("kijitora@example.jp"), ..NO
            },
            Case {
                input: "host relay.example.net [192.0.2.222] SMTP error from remote mail server after initial connection: 571 No PTR Record found.",
                form: Form::Wrapped, code: Some(571), text: "No PTR Record found.", host: Some("relay.example.net"), ip: Some("192.0.2.222"), stage: Some(Greeting), ..NO
            },
            Case {
                input: "192.0.2.25 does not like recipient. Remote host said: 550 5.1.1 <u@x.net>: Recipient address rejected: User unknown.",
                form: Form::Wrapped, code: Some(550), enhanced: "5.1.1", text: "<u@x.net>: Recipient address rejected: User unknown.", stage: Some(RcptTo), ..NO
            },
            Case {
                input: "mail-inbound.example.net [192.0.2.25] did not like our RCPT TO:550 5.7.25 <b@x.net>: Reverse DNS validation failed",
                form: Form::Wrapped, code: Some(550), enhanced: "5.7.25", text: "<b@x.net>: Reverse DNS validation failed",
                host: Some("mail-inbound.example.net"), ip: Some("192.0.2.25"), stage: Some(RcptTo), ..NO
            },
            Case { input: "Sorry, no mailbox here by that name. (#5.1.1)", enhanced: "5.1.1", text: "Sorry, no mailbox here by that name. (#5.1.1)", ..NO },
            Case { input: "User unknown: 550 Requested User Mailbox not found.", code: Some(550), text: "Requested User Mailbox not found.", ..NO },
            Case {
                input: "Technical details of permanent failure: Google tried to deliver your message. The error that the other server returned was: 550 5.2.2 <m@x.jp>... Mailbox Full",
                form: Form::Wrapped, code: Some(550), enhanced: "5.2.2", text: "<m@x.jp>... Mailbox Full", ..NO
            },
        ];
        for c in cases {
            let p = parse(c.input);
            let want = Parsed {
                form: c.form,
                code: c.code,
                enhanced: e(c.enhanced),
                status: e(c.status),
                text: c.text,
                mx_host: c.host,
                mx_ip: c.ip,
                stage: c.stage,
                recipient: c.rcpt,
            };
            assert_eq!(p, want, "input: {}", c.input);
        }
    }

    #[test]
    fn continuations_are_stripped_for_matching() {
        let cases = [
            (
                "likely 550-5.7.1 unsolicited mail.",
                Some(550),
                "5.7.1",
                "likely unsolicited mail.",
            ),
            (
                "email 421 4.7.28 originating from",
                Some(421),
                "4.7.28",
                "email originating from",
            ),
            (
                "line one\r\n550-5.7.1 line two\r\n550 5.7.1 three",
                Some(550),
                "5.7.1",
                "line one line two three",
            ),
            (
                "no continuation here",
                Some(550),
                "5.7.1",
                "no continuation here",
            ),
            (
                "blocked 550 Error - Blocked",
                Some(550),
                "",
                "blocked Error - Blocked",
            ),
            (
                "keeps 503 other codes",
                Some(550),
                "",
                "keeps 503 other codes",
            ),
        ];
        for (text, code, enh, want) in cases {
            let mut buf = [0u8; 256];
            assert_eq!(
                strip_continuations(text, code, e(enh), &mut buf),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn long_input_is_bounded() {
        let long = format!("550 5.1.1 {}", "é".repeat(MAX_REPLY_LEN));
        let p = parse(&long);
        assert_eq!(p.code, Some(550));
        assert!(p.text.len() <= MAX_REPLY_LEN);
    }

    #[test]
    fn case_insensitive_search_finds_first_and_last() {
        let needles = [
            ci!("status="),
            ci!("abc"),
            ci!(" did not like our "),
            ci!("x"),
            ci!("aa"),
        ];
        let hays = [
            "",
            "a",
            "STATUS=x status=",
            "abcABCaBc",
            "xx did NOT like our x",
            "aaaa",
            "=status=",
            "ab",
        ];
        for n in needles {
            assert!(n.rare < n.bytes.len());
            for h in hays {
                let hb = h.as_bytes();
                let hits: Vec<usize> = (0..hb.len())
                    .filter(|&i| {
                        hb.len() - i >= n.bytes.len()
                            && hb[i..i + n.bytes.len()].eq_ignore_ascii_case(n.bytes)
                    })
                    .collect();
                assert_eq!(find_ci(h, n), hits.first().copied(), "{h:?}");
                assert_eq!(rfind_ci(h, n), hits.last().copied(), "{h:?}");
            }
        }
        assert_eq!(ci!("status=").bytes[ci!("status=").rare], b'=');
    }

    #[test]
    fn needs_strip_matches_its_definition() {
        let plain = |text: &str, code: Option<u16>| {
            let b = text.as_bytes();
            b.iter().any(|&c| c == b'\n' || c == b'\r')
                || code.map(code_digits).is_some_and(|cb| {
                    b.windows(5)
                        .any(|w| w[0] == b' ' && w[1..4] == cb && matches!(w[4], b' ' | b'-'))
                })
        };
        let texts = [
            "",
            "550",
            " 550 ",
            " 550-",
            "x 550 y",
            "x 550",
            "550 x",
            " 5505 ",
            "a\rb",
            "line\n",
            " 55 550",
            "5 550-5.7.1",
            " 421 4.7.0 and 421-x",
            "x 450 x",
            " 550 550 ",
        ];
        for t in texts {
            for code in [None, Some(550), Some(421)] {
                assert_eq!(needs_strip(t, code), plain(t, code), "{t:?} {code:?}");
            }
        }
        assert_eq!(qmail_status("no (#5.1.1) x"), e("5.1.1"));
        assert_eq!(qmail_status("#(# (#4.2.2)"), None);
        assert_eq!(qmail_status("#x (#4.2.2)"), e("4.2.2"));
    }

    #[test]
    fn leads_keep_their_preference() {
        let plain = |s: &str| {
            LEADS.iter().find_map(|l| {
                let (h, n) = (s.as_bytes(), *l);
                (0..=h.len().saturating_sub(n.len()))
                    .find(|&i| h.len() >= n.len() && h[i..i + n.len()].eq_ignore_ascii_case(n))
                    .map(|i| i + n.len())
            })
        };
        for s in [
            "",
            "x: y",
            "Reported error: a The response was: b",
            "the RESPONSE was: 550 x. The response was: y",
            "It responded as follows: The error that the other server returned was: 5",
            "response was:",
        ] {
            assert_eq!(after_lead(s), plain(s), "{s}");
        }
        assert!(LEADS.iter().all(|l| l.ends_with(b":")));
    }
}
