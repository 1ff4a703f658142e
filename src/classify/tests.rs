//! Classifier tests: reply forms end to end, the rule order, providers, hints.

use super::*;

fn c() -> Classifier {
    Classifier::builtin()
}

/// (reply, expected class, provider, blamed, deciding rule id)
fn check(cases: &[(&str, &str, &str, &str, &str)]) {
    let c = c();
    let mut bad = Vec::new();
    for &(reply, class, provider, blamed, rule) in cases {
        let v = c.classify(reply, Hints::default());
        let got = (
            v.class.as_str(),
            c.provider_name(v.provider),
            v.blamed.as_str(),
            c.rule_id_str(v.rule),
        );
        if got != (class, provider, blamed, rule) {
            bad.push(format!(
                "{reply}\n  want {class} {provider:?} {blamed} {rule}\n  got  {got:?}"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn every_reply_form_classifies() {
    check(&[
        // Postfix log line, multi-line Gmail reply joined with a space.
        ("Nov 24 19:56:39 vm postfix/smtp[11694]: 8593C98C123: to=<user@gmail.test>, relay=gmail-smtp-in.l.google.com[142.250.1.27]:25, delay=2.7, delays=2.7/0/0/0, dsn=4.7.28, status=deferred (host gmail-smtp-in.l.google.com[142.250.1.27] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later. (in reply to end of DATA command))",
            "rate_limited", "gmail", "ip", "gmail.unusual_rate.ip"),
        // Status-filter key, whole.
        ("4.7.28 host 127.0.0.2[127.0.0.2] said: 421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later. (in reply to RCPT TO command)",
            "rate_limited", "gmail", "ip", "gmail.unusual_rate.ip"),
        ("2.0.0 250 2.0.0 Ok: queued", "delivered", "", "none", "delivered.2xx"),
        ("4.2.1 host 127.0.0.2[127.0.0.2] said: 450 4.2.1 Mailbox temporarily unavailable (in reply to RCPT TO command)",
            "temp_failure", "", "recipient", "temp.mailbox"),
        ("5.1.1 host 127.0.0.2[127.0.0.2] said: 550 5.1.1 The email account that you tried to reach does not exist (in reply to RCPT TO command)",
            "recipient_unknown", "gmail", "recipient", "gmail.account.not_exist"),
        ("4.2.2 host 127.0.0.2[127.0.0.2] said: 452 4.2.2 The email account that you tried to reach is over quota (in reply to end of DATA command)",
            "mailbox_full", "gmail", "recipient", "gmail.account.over_quota"),
        ("5.7.1 host 127.0.0.2[127.0.0.2] said: 554 5.7.1 Message rejected due to content (in reply to end of DATA command)",
            "content_rejected", "", "message", "content.rejected"),
        ("4.3.0 host 127.0.0.2[127.0.0.2] said: 451 4.3.0 DATA command refused, try again (in reply to DATA command)",
            "temp_failure", "", "none", "rfc3463.x.3.x"),
        // Connection-level failures.
        ("4.4.1 connect to 127.0.0.9[127.0.0.9]:2525: Connection refused", "network_error", "", "none", "net.connect"),
        ("4.4.1 connect to 127.0.0.10[127.0.0.10]:2525: Connection timed out", "network_error", "", "none", "net.connect"),
        ("4.4.2 conversation with 127.0.0.4[127.0.0.4] timed out while receiving the initial server greeting", "network_error", "", "none", "net.conversation_timeout"),
        ("4.4.2 lost connection with 127.0.0.2[127.0.0.2] while sending RCPT TO", "network_error", "", "none", "net.lost_connection"),
        ("4.3.2 host 127.0.0.3[127.0.0.3] refused to talk to me: 421 4.3.2 Service not available, closing transmission channel", "temp_failure", "", "none", "rfc3463.x.3.x"),
        ("5.4.4 unable to look up host nohop.test: Name or service not known", "domain_invalid", "", "recipient", "dns.host_not_found"),
        ("Host or domain name not found. Name service error for name=example.invalid type=MX: Host not found", "domain_invalid", "", "recipient", "dns.host_not_found"),
        ("Host or domain name not found. Name service error for name=example.com type=MX: Host not found, try again", "network_error", "", "none", "dns.temporary"),
        ("delivery temporarily suspended: lost connection with 127.0.0.6[127.0.0.6] while receiving the initial server greeting", "network_error", "", "none", "net.lost_connection"),
        // DSN and Exchange.
        ("Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>... User unknown", "recipient_unknown", "", "recipient", "recipient.unknown"),
        ("Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'", "recipient_unknown", "microsoft", "recipient", "recipient.unknown"),
        // Greeting refusal: only the IP can be meant.
        ("host mx.example.net[192.0.2.1] refused to talk to me: 554 Service unavailable", "reputation_block", "", "ip", "reject.before_mail"),
        // Raw multi-line with CRLF, phrase split across lines.
        ("550-5.7.1 [203.0.113.7] Our system has detected that this message is likely\r\n550-5.7.1 unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n550 5.7.1 this message has been blocked.",
            "spam_rejected", "gmail", "message", "gmail.likely_unsolicited"),
    ]);
}

#[test]
fn text_decides_over_code_and_the_order_holds() {
    // Each pair of overlapping rules: the earlier one must win. This pins the priority order
    // where it matters; the invariants test below pins the bands.
    check(&[
        ("421 4.7.0 [TS03] All messages from 203.0.113.7 will be permanently deferred; Retrying will NOT succeed.", "reputation_block", "yahoo", "ip", "yahoo.permanently_deferred"),
        ("550 5.2.0 [OFR_506] Unfortunately, messages from your IP were not accepted.", "reputation_block", "orange", "ip", "orange.ip_rejected"),
        ("421 4.7.28 Gmail has detected an unusual rate of unsolicited email originating from your SPF domain [b.example.com].", "rate_limited", "gmail", "spf_domain", "gmail.unusual_rate.spf_domain"),
        ("421 4.7.28 Gmail has detected an unusual rate of unsolicited email originating from your DKIM domain [example.com].", "rate_limited", "gmail", "dkim_domain", "gmail.unusual_rate.dkim_domain"),
        ("550 5.7.28 Gmail has detected an unusual rate of unsolicited email", "reputation_block", "gmail", "ip", "gmail.unusual_rate.5xx"),
        ("550 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "reputation_block", "", "ip", "blocklist.spamhaus"),
        ("554 5.7.1 Service unavailable; Sender address [a@b.example] blocked using dbl.spamhaus.org", "reputation_block", "", "from_domain", "blocklist.domain"),
        ("550 5.7.1 Message rejected due to spam content.", "spam_rejected", "", "message", "spam.explicit"),
        ("554 5.7.1 Message rejected due to content policy.", "content_rejected", "", "message", "content.rejected"),
        ("554 5.7.1 Message rejected by policy", "policy_rejected", "", "none", "policy.rejected"),
        ("554 5.7.1 <x@example.org>: Relay access denied", "relay_denied", "", "none", "relay.denied"),
        ("550 5.2.1 <x@example.jp>... User Unknown", "recipient_unknown", "", "recipient", "recipient.unknown"),
        ("550 5.2.1 Mailbox disabled, not accepting messages", "mailbox_disabled", "", "recipient", "mailbox.disabled"),
        ("550 5.7.9 Rejected", "auth_failure", "", "none", "rfc3463.x.7.auth"),
        ("451 4.7.1 Please try again later", "greylisted", "", "none", "temp.greylist_like"),
        ("421 4.7.0 Try again later, closing connection.", "rate_limited", "", "ip", "rate.limited"),
        ("451 4.3.0 Temporary server error. Please try again later", "temp_failure", "", "none", "rfc3463.x.3.x"),
        ("553 5.1.8 <a@b.example>... Domain of sender address a@b.example does not exist", "policy_rejected", "", "from_domain", "sender.rejected"),
        ("550 5.7.25 The IP address sending this message does not have a PTR record setup", "auth_failure", "", "ip", "auth.ptr"),
        ("550 5.7.1 Unfortunately, messages from [203.0.113.7] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", "reputation_block", "microsoft", "ip", "microsoft.banned_ip"),
        ("550 No such user here", "recipient_unknown", "", "recipient", "recipient.unknown"),
        ("550 Nope", "unknown", "", "none", "smtp.5xx"),
    ]);
}

#[test]
fn rule_order_keeps_its_bands() {
    // Rules are tried by priority: delivered and connection forms first, provider wording
    // before block lists, generic wording before the code fallbacks, base codes last.
    let c = c();
    let ids: Vec<&str> = c.rule_ids().collect();
    let pos = |id: &str| {
        ids.iter()
            .position(|x| *x == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let ordered = [
        "delivered.2xx",
        "net.connect",
        "dns.host_not_found",
        "gmail.unusual_rate.5xx",
        "gmail.unusual_rate.spf_domain",
        "gmail.unusual_rate.ip",
        "microsoft.ip_reputation_rate",
        "yahoo.permanently_deferred",
        "yahoo.temporarily_deferred",
        "blocklist.domain",
        "blocklist.spamhaus",
        "blocklist.generic",
        "spam.explicit",
        "auth.dmarc",
        "reputation.ip_blocked",
        "rate.limited",
        "mailbox.full",
        "mailbox.disabled",
        "domain.invalid",
        "recipient.unknown",
        "size.too_large",
        "spam.content",
        "content.rejected",
        "rfc3463.x.1.recipient",
        "rfc3463.x.7.dkim",
        "reject.before_mail",
        "recipient.address_rejected",
        "policy.rejected",
        "temp.greylist_like",
        "temp.server",
        "rfc3463.4.7.x",
        "rfc3463.5.7.x",
        "smtp.421",
        "smtp.5xx",
        "status.4",
    ];
    for w in ordered.windows(2) {
        assert!(pos(w[0]) < pos(w[1]), "{} must come before {}", w[0], w[1]);
    }
    // Every provider file's rules come before the generic wording layer.
    let first_generic = pos("spam.explicit");
    for (i, id) in ids.iter().enumerate() {
        let provider_rule = [
            "gmail.",
            "microsoft.",
            "yahoo.",
            "apple.",
            "orange.",
            "gmx.",
            "comcast.",
        ]
        .iter()
        .any(|p| id.starts_with(p));
        if provider_rule {
            assert!(i < first_generic, "{id} sorts after the generic layer");
        }
    }
}

#[test]
fn providers_by_mx_domain_and_token() {
    let c = c();
    let name = |id| c.provider_name(id).to_string();
    for (host, want) in [
        ("gmail-smtp-in.l.google.com", "gmail"),
        ("ALT2.ASPMX.L.GOOGLE.COM.", "gmail"),
        ("example-com.mail.protection.outlook.com", "microsoft"),
        ("hotmail-com.olc.protection.outlook.com", "microsoft"),
        ("mta7.am0.yahoodns.net", "yahoo"),
        ("mx01.mail.icloud.com", "apple"),
        ("smtp-in.orange.fr", "orange"),
        ("mx00.emig.gmx.net", "gmx"),
        ("mx1.comcast.net", "comcast"),
        ("mx.example.org", ""),
        ("", ""),
    ] {
        assert_eq!(name(c.provider_for_mx(host)), want, "{host}");
    }
    for (domain, want) in [
        ("gmail.com", "gmail"),
        ("GoogleMail.com", "gmail"),
        ("outlook.com", "microsoft"),
        ("aol.com", "yahoo"),
        ("icloud.com", "apple"),
        ("web.de", "gmx"),
        ("gmail.com.", "gmail"),
        (" Web.DE ", "gmx"),
        ("example.com", ""),
        ("mail.gmail.com", ""),
    ] {
        assert_eq!(name(c.provider_for_domain(domain)), want, "{domain}");
    }
    // A wildcard domain pattern: the globs are tried, in provider order.
    let wild = "[provider]\nname = \"acme\"\ndescription = \"x\"\nmx = []\ndomains = [\"*.acme.example\", \"acme.example\"]\n";
    let mut sources = BUILTIN_SOURCES.to_vec();
    sources.push(("acme.toml", wild));
    let w = Classifier::from_sources(&sources).unwrap();
    let wname = |p: ProviderId| w.provider_name(p).to_string();
    for (domain, want) in [
        ("eu.ACME.example", "acme"),
        ("acme.example", "acme"),
        ("gmail.com", "gmail"),
        ("example.com", ""),
    ] {
        assert_eq!(wname(w.provider_for_domain(domain)), want, "{domain}");
    }
    assert_eq!(c.provider_name(ProviderId::NONE), "");
    assert!(c.provider_count() >= 8);
    assert_eq!(
        c.provider_by_name("GMAIL").map(name).as_deref(),
        Some("gmail")
    );

    // The MX hint beats wording; the rule's provider beats a stray token.
    let v = c.classify(
        "550 5.1.1 User unknown",
        Hints {
            mx_host: Some("mx01.mail.icloud.com"),
            status: None,
        },
    );
    assert_eq!(name(v.provider), "apple");
    let v = c.classify(
        "250 2.0.0 OK 1732468912 a1si123456plg.99 - gsmtp",
        Hints::default(),
    );
    assert_eq!(name(v.provider), "gmail");
    let v = c.classify(
        "Nov 1 00:00:00 h postfix/smtp[1]: A: to=<u@yahoo.com>, relay=none, delay=1, delays=0/0/1/0, dsn=4.4.1, status=deferred (connect to mx[192.0.2.1]:25: Connection refused)",
        Hints::default(),
    );
    assert_eq!(name(v.provider), "yahoo", "from the recipient domain");
}

#[test]
fn hints_and_permanence() {
    let c = c();
    // The status hint fills the enhanced code when the text has none.
    let v = c.classify(
        "connect to mx.example.net[192.0.2.1]:25: Connection refused",
        Hints {
            mx_host: None,
            status: Some("4.4.1"),
        },
    );
    assert_eq!(v.enhanced, Enhanced::parse("4.4.1"));
    assert!(!v.permanent);
    let v = c.classify("Domain does not exist", Hints::default());
    assert_eq!((v.class, v.permanent), (Class::DomainInvalid, false));
    let v = c.classify("5.1.1 <a@b.example>... User Unknown", Hints::default());
    assert!(v.permanent, "5.x.x without a base code is permanent");
    let v = c.classify("421 4.7.0 [TS03] permanently deferred", Hints::default());
    assert!(
        !v.permanent,
        "permanent follows the base code, not the class"
    );
    assert_eq!(v.code, Some(421));
    let v = c.classify("Host or domain name not found. Name service error for name=x.invalid type=MX: Host not found", Hints::default());
    assert!(
        v.permanent,
        "a code-less NXDOMAIN takes the rule's permanence"
    );
}

#[test]
fn explain_names_rule_and_advice() {
    let c = c();
    let e = c.explain(
        "421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your SPF domain [b.example]. (in reply to RCPT TO command)",
        Hints::default(),
    );
    assert_eq!(e.rule_id, "gmail.unusual_rate.spf_domain");
    assert!(e.rule_origin.starts_with("config/rules/gmail.toml:"));
    assert!(!e.advice.is_empty() && !e.description.is_empty());
    assert_eq!(e.parsed.stage, Some(SmtpStage::RcptTo));
    assert!(!e.match_text.contains("421 4.7.28"), "{}", e.match_text);
    let shown = e.to_string();
    for part in [
        "rule:",
        "gmail.unusual_rate.spf_domain",
        "next step:",
        "stage:       rcpt_to",
        "blamed:      spf_domain",
    ] {
        assert!(shown.contains(part), "{shown}");
    }
    assert_eq!(c.rule_id_str(RuleId(0)), "");
    assert!(c.rule_count() > 50);
    assert_eq!(c.rule_advice(e.verdict.rule), e.advice);
}

#[test]
fn from_sources_layers_over_builtin() {
    let extra = r#"
[[rule]]
id = "local.custom"
priority = 1
text = "frobnicated"
class = "policy_rejected"
description = "Local rule."

[[rule]]
id = "recipient.unknown"
priority = 440
override = true
text = "never matches anything xyzzy"
class = "recipient_unknown"
description = "Disabled by override."
"#;
    let mut sources = BUILTIN_SOURCES.to_vec();
    sources.push(("local.toml", extra));
    let c = Classifier::from_sources(&sources).unwrap();
    let v = c.classify("550 5.7.1 frobnicated", Hints::default());
    assert_eq!(c.rule_id_str(v.rule), "local.custom");
    let v = c.classify("550 User unknown", Hints::default());
    assert_ne!(c.rule_id_str(v.rule), "recipient.unknown");

    let dup = r#"
[[rule]]
id = "recipient.unknown"
priority = 1
text = "x"
class = "unknown"
description = "d"
"#;
    let mut sources = BUILTIN_SOURCES.to_vec();
    sources.push(("dup.toml", dup));
    let err = Classifier::from_sources(&sources).unwrap_err().to_string();
    assert!(
        err.contains("dup.toml:2") && err.contains("duplicate id") && err.contains("generic.toml"),
        "{err}"
    );
}

#[test]
fn builtin_rules_compile_and_every_rule_has_advice() {
    let c = c();
    for i in 1..=c.rule_count() {
        let id = RuleId(i as u16);
        assert!(
            !c.rule_advice(id).is_empty(),
            "rule {} has no advice",
            c.rule_id_str(id)
        );
    }
}

#[test]
fn more_provider_and_generic_phenomena() {
    check(&[
        ("421-4.7.29 Your email has been rate limited because this message wasn't sent over a TLS connection.", "protocol_error", "gmail", "none", "gmail.tls_required"),
        ("421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel", "rate_limited", "", "ip", "rate.limited"),
        ("450 4.7.1 Client host rejected: Too many connections from your IP", "rate_limited", "", "ip", "rate.limited"),
        ("450 4.7.1 <mail.example.com>: Helo command rejected: Host not found", "auth_failure", "", "ip", "auth.ptr"),
        ("554 5.7.0 Reject, id=12345-01 - BANNED: invoice.exe", "content_rejected", "", "message", "content.virus"),
        ("550 5.7.9 This mail has been blocked because the sender is unauthenticated. Yahoo requires all senders to authenticate with either SPF or DKIM.", "auth_failure", "yahoo", "from_domain", "auth.unauthenticated"),
        ("552 5.1.1 Boite du destinataire pleine. Recipient overquota. OFR_417 [417]", "mailbox_full", "orange", "recipient", "mailbox.full"),
        ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using b.barracudacentral.org", "reputation_block", "", "ip", "blocklist.barracuda"),
        ("554-gmx.net (mxgmx016) Nemesis ESMTP Service not available 554-No SMTP service 554-Bad DNS PTR resource record.", "auth_failure", "gmx", "ip", "gmx.bad_ptr"),
        ("554 5.7.1 resimta Comcast block for spam. Please see http://postmaster.comcast.net/smtp-error-codes.php#BL000000", "reputation_block", "comcast", "ip", "comcast.block"),
        ("550 5.7.1 [CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", "policy_rejected", "apple", "none", "apple.local_policy"),
    ]);
}

/// The plain meaning of the rule table, without any of the matcher's shortcuts: every token
/// and every rule tried in order, each regex searched over the whole text.
fn reference(c: &Classifier, reply: &str, hints: Hints<'_>) -> Verdict {
    let inner = &*c.inner;
    let parsed = parse(reply);
    let mut buf = vec![0u8; parse::MAX_REPLY_LEN];
    let text = parse::strip_continuations(parsed.text, parsed.code, parsed.enhanced, &mut buf);
    let enhanced = parsed
        .effective_enhanced()
        .or_else(|| hints.status.and_then(|s| Enhanced::parse(s.trim())));
    let by_host = hints
        .mx_host
        .map(|h| c.provider_for_mx(h))
        .filter(|p| !p.is_none())
        .or_else(|| parsed.mx_host.map(|h| c.provider_for_mx(h)))
        .unwrap_or(ProviderId::NONE);
    let by_domain = parsed
        .recipient
        .and_then(|r| r.rsplit_once('@'))
        .map_or(ProviderId::NONE, |(_, d)| c.provider_for_domain(d));
    let by_token = inner
        .tokens
        .iter()
        .find(|t| {
            t.re.is_match(text)
                || parsed.mx_host.is_some_and(|h| t.re.is_match(h))
                || hints.mx_host.is_some_and(|h| t.re.is_match(h))
        })
        .map_or(ProviderId::NONE, |t| t.provider);
    let detected = by_host.or(by_domain).or(by_token);
    let chosen = inner.rules.iter().position(|r| {
        r.conditions_hold(parsed.code, enhanced, parsed.stage, detected)
            && r.text.as_ref().is_none_or(|re| re.is_match(text))
            && !r.unless.as_ref().is_some_and(|re| re.is_match(text))
    });
    let rule = chosen.map(|r| &inner.rules[r]);
    let provider = by_host
        .or(rule.map_or(ProviderId::NONE, |r| r.provider))
        .or(by_domain)
        .or(by_token);
    Verdict {
        class: rule.map_or(Class::Unknown, |r| r.class),
        provider,
        blamed: rule.map_or(Blamed::None, |r| r.blamed),
        permanent: match (parsed.code, enhanced) {
            (Some(code), _) => code >= 500,
            (None, Some(e)) => e.is_permanent(),
            (None, None) => rule.and_then(|r| r.permanent).unwrap_or(false),
        },
        code: parsed.code,
        enhanced,
        rule: RuleId(chosen.map_or(0, |r| r as u16 + 1)),
    }
}

#[test]
fn matcher_agrees_with_the_plain_rule_table() {
    agrees_with_the_plain_rule_table(&c());
}

/// Operators may add hundreds of rules: the candidate set then outgrows its small form.
#[test]
fn matcher_agrees_with_the_plain_rule_table_with_many_rules() {
    let mut extra = String::new();
    for i in 0..600 {
        extra.push_str(&format!(
            "[[rule]]\nid = \"local.r{i}\"\npriority = {}\ntext = \"zq{i}x(yy|ww)\"\n\
             class = \"policy_rejected\"\ndescription = \"d\"\n\n",
            1000 + i
        ));
    }
    let mut sources = BUILTIN_SOURCES.to_vec();
    sources.push(("many.toml", &extra));
    let c = Classifier::from_sources(&sources).unwrap();
    assert!(c.rule_count() > 700);
    let v = c.classify("zq599xww", Hints::default());
    assert_eq!(c.rule_id_str(v.rule), "local.r599");
    agrees_with_the_plain_rule_table(&c);
}

fn agrees_with_the_plain_rule_table(c: &Classifier) {
    const SEED: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/seed-replies.tsv"
    ));
    const CORPUS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/corpus/dev.tsv"
    ));
    let mut replies: Vec<String> = SEED
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .chain(CORPUS.lines().skip(1))
        .filter_map(|l| l.split('\t').next())
        .map(String::from)
        .collect();
    let n = replies.len();
    // Variants that move literals around: case, a wrapper in front, two phenomena in one
    // reply, and the reply cut at its first space (literals at the very start and end).
    for i in 0..n {
        let r = replies[i].clone();
        replies.push(r.to_ascii_uppercase());
        replies.push(format!(
            "4.0.0 host mx.example.net[192.0.2.1] said: {r} (in reply to end of DATA command)"
        ));
        replies.push(format!("{r} {}", replies[(i * 7 + 3) % n]));
        if let Some((_, tail)) = r.split_once(' ') {
            replies.push(tail.to_string());
        }
    }
    let gmail = Hints {
        mx_host: Some("gmail-smtp-in.l.google.com"),
        status: Some("4.7.1"),
    };
    let mut bad = Vec::new();
    for r in &replies {
        for hints in [Hints::default(), gmail] {
            let (want, got) = (reference(c, r, hints), c.classify(r, hints));
            if want != got {
                bad.push(format!(
                    "{r}\n  reference {} ({want:?})\n  matcher   {} ({got:?})",
                    c.rule_id_str(want.rule),
                    c.rule_id_str(got.rule)
                ));
            }
        }
    }
    assert!(replies.len() > 1500, "{} replies", replies.len());
    assert!(bad.is_empty(), "{} differ:\n{}", bad.len(), bad.join("\n"));
}
