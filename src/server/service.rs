//! Request → answer: the one place that turns a protocol-neutral query into engine calls.
//!
//! Answers borrow their dynamic text from a per-connection scratch `String`, so the
//! steady path formats into reused memory instead of allocating per request.

use crate::config::Config;
use crate::metrics as m;
use crate::protocol::{Answer, Kind, Query, Reply};
use crate::shaping::engine::{
    domain_of, Action, Admission, Decision, Hold, PolicyVerdict, ReportInput, Setup,
};
use crate::shaping::site::Site;
use crate::shaping::{Engine, Stage};
use crate::store::Store;
use arc_swap::ArcSwap;
use std::fmt::Write;
use std::sync::Arc;

/// Shared by every connection.
pub struct Service {
    pub engine: Arc<Engine>,
    pub config: ArcSwap<Config>,
    pub store: Store,
}

/// What a handled request needs after the answer is built.
#[derive(Default)]
pub struct Outcome {
    /// The answer promises state that must be durable before it is sent.
    pub durable: bool,
}

/// Formats into `scratch` and returns the written slice's range.
fn put(scratch: &mut String, args: std::fmt::Arguments<'_>) -> std::ops::Range<usize> {
    let start = scratch.len();
    let _ = scratch.write_fmt(args);
    start..scratch.len()
}

/// The `action` word of a report's answer, in Postfix's access(5) vocabulary that the
/// policy protocol already speaks: `DUNNO` (nothing to do), `DEFER` (try again after
/// `retry_after`), `REJECT` (do not retry).
pub fn action_word(action: Action) -> &'static str {
    match action {
        Action::Ok => "DUNNO",
        Action::Retry => "DEFER",
        Action::Bounce => "REJECT",
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for operator-facing texts.
pub fn format_unix(secs: u64) -> String {
    let rem = secs % 86400;
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        crate::config::format_date((secs / 86400) as i64),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Service {
    pub fn new(engine: Arc<Engine>, config: Arc<Config>, store: Store) -> Service {
        Service {
            engine,
            config: ArcSwap::new(config),
            store,
        }
    }

    /// Answers one request. Text the answer needs is formatted into `scratch`.
    pub fn handle<'s>(
        &self,
        q: &Query<'_>,
        scratch: &'s mut String,
        out: &mut Outcome,
    ) -> Answer<'s> {
        scratch.clear();
        match q.kind {
            Kind::AccessPolicy => self.access_policy(q, scratch),
            Kind::DeliveryReport => {
                let d = self.engine.report(&report_input(q));
                out.durable = d.durable;
                self.decision_answer(&d, q, scratch)
            }
            Kind::DestinationQuery => self.destination_query(q, scratch),
            Kind::StatusLookup => {
                let d = self.engine.report(&report_input(q));
                out.durable = d.durable;
                self.status_answer(&d, q, scratch)
            }
            Kind::TransportLookup => self.transport_answer(q, scratch),
            Kind::Unknown => {
                m::decision(q.kind.as_str(), "unknown");
                Answer::unknown_request()
            }
        }
    }

    fn access_policy<'s>(&self, q: &Query<'_>, scratch: &'s mut String) -> Answer<'s> {
        let Some(rcpt) = q.recipient.filter(|r| !r.is_empty()) else {
            m::decision(q.kind.as_str(), "dunno");
            return Answer::action("DUNNO");
        };
        let config = self.config.load();
        match self.engine.policy(rcpt, config.policy.enforce_suppression) {
            PolicyVerdict::Dunno => {
                m::decision("smtpd_access_policy", "dunno");
                Answer::action("DUNNO")
            }
            PolicyVerdict::Suppressed(s) => {
                m::decision("smtpd_access_policy", "suppressed");
                let r = put(
                    scratch,
                    format_args!(
                        "{} <{}>: recipient suppressed since {} after {} ({})",
                        config.policy.suppressed_action,
                        rcpt.trim_matches(|c| c == '<' || c == '>'),
                        format_unix(s.since),
                        s.class,
                        s.reply
                    ),
                );
                Answer::action(&scratch[r])
            }
            PolicyVerdict::Suspended { site, until } => {
                m::decision("smtpd_access_policy", "suspended");
                let r = put(
                    scratch,
                    format_args!(
                        "{} mxpace: deliveries to {} are suspended until {}",
                        config.policy.suspended_action,
                        site,
                        format_unix(until)
                    ),
                );
                Answer::action(&scratch[r])
            }
        }
    }

    fn decision_answer<'s>(
        &self,
        d: &Decision,
        q: &Query<'_>,
        scratch: &'s mut String,
    ) -> Answer<'s> {
        let setup = self.engine.setup();
        // The reply may not name its provider (`250 OK`); the destination does.
        let named = setup.classifier.provider_name(d.verdict.provider);
        let provider = if named.is_empty() {
            provider_of(&setup, q.recipient_domain().unwrap_or(""), scratch)
        } else {
            Some(put(scratch, format_args!("{named}")))
        };
        let stage = d.stage.as_str();
        m::decision("delivery_report", d.action.as_str());
        Answer {
            reply: Reply::Action(action_word(d.action)),
            class: Some(d.verdict.class),
            provider: provider.map(|r| &scratch[r]),
            blamed: Some(d.verdict.blamed),
            stage: Some(stage),
            retry_after: Some(d.retry_after as u64),
            concurrency: Some(d.concurrency),
            rate: Some(d.rate),
        }
    }

    fn status_answer<'s>(
        &self,
        d: &Decision,
        q: &Query<'_>,
        scratch: &'s mut String,
    ) -> Answer<'s> {
        // Safety net: while blocked, a 5xx block reply becomes a 4xx deferral so the
        // mail waits for the block to lift instead of bouncing. Postfix accepts 4↔5.
        if d.defer_block && d.action != Action::Ok {
            if let (Some(status), Some(text)) = (q.status, q.reply) {
                if let Some(rest) = status.strip_prefix('5') {
                    m::decision("status", "defer_block");
                    let r = put(scratch, format_args!("4{rest} {text}"));
                    return Answer::action(&scratch[r]);
                }
            }
        }
        m::decision("status", d.action.as_str());
        Answer::not_found()
    }

    /// Answers one request like [`Service::handle`]; in fleet mode a transport lookup
    /// takes its token from the shared Redis (one round trip, at most `redis_timeout`).
    pub async fn handle_async<'s>(
        &self,
        q: &Query<'_>,
        scratch: &'s mut String,
        out: &mut Outcome,
    ) -> Answer<'s> {
        if let (Kind::TransportLookup, Some(fleet)) = (q.kind, self.store.fleet()) {
            scratch.clear();
            let Some((rcpt, pool)) = transport_key(q) else {
                return Answer::not_found();
            };
            let admission = match self.engine.plan_admission(rcpt, pool) {
                Ok(plan) => fleet.admit(&self.engine, &plan).await,
                Err(decided) => decided,
            };
            return admission_answer(admission, scratch);
        }
        self.handle(q, scratch, out)
    }

    fn transport_answer<'s>(&self, q: &Query<'_>, scratch: &'s mut String) -> Answer<'s> {
        let Some((rcpt, pool)) = transport_key(q) else {
            return Answer::not_found();
        };
        admission_answer(self.engine.admit(rcpt, pool), scratch)
    }
    fn destination_query<'s>(&self, q: &Query<'_>, scratch: &'s mut String) -> Answer<'s> {
        let name = q.domain.or(q.recipient).or(q.context).unwrap_or("");
        let views = self.engine.query(name);
        let now = self.engine.clock().unix_now();
        let pool = q.pool.or(q.source_ip);
        let view = views
            .iter()
            .find(|v| Some(v.identity.as_str()) == pool)
            .or_else(|| views.iter().max_by_key(|v| v.stage));
        let (rate, concurrency, stage, retry) = match view {
            Some(v) => (
                v.rate,
                v.concurrency,
                v.stage,
                v.suspended_until
                    .map(|u| u.saturating_sub(now))
                    .unwrap_or(0),
            ),
            None => {
                let (_, rate, conc) = self.engine.site_defaults(name);
                (rate, conc, Stage::Trusted, 0)
            }
        };
        let provider = provider_of(&self.engine.setup(), name, scratch);
        Answer {
            // The same words as a report's answer: mail for a suspended destination waits.
            reply: Reply::Action(action_word(if retry > 0 {
                Action::Retry
            } else {
                Action::Ok
            })),
            class: None,
            provider: provider.map(|r| &scratch[r]),
            blamed: None,
            stage: Some(stage.as_str()),
            retry_after: Some(retry),
            concurrency: Some(concurrency),
            rate: Some(rate),
        }
    }
}

/// The provider of a recipient or domain, formatted into `scratch`: its configured
/// site, else the rule files' provider for the domain; `None` for any other domain.
fn provider_of(setup: &Setup, name: &str, scratch: &mut String) -> Option<std::ops::Range<usize>> {
    let domain = domain_of(name).unwrap_or(name);
    if domain.is_empty() {
        return None;
    }
    if let Some(n) = setup
        .sites
        .named(domain)
        .or_else(|| setup.sites.for_domain(domain, &setup.classifier))
    {
        return Some(put(
            scratch,
            format_args!("{}", setup.label(Site::Named(n))),
        ));
    }
    let id = setup.classifier.provider_for_domain(domain);
    let named = setup.classifier.provider_name(id);
    (!named.is_empty()).then(|| put(scratch, format_args!("{named}")))
}

/// The recipient and pool of a transport lookup; `None` when it names no domain.
fn transport_key<'q>(q: &Query<'q>) -> Option<(&'q str, Option<&'q str>)> {
    let rcpt = q.recipient.or(q.key)?;
    domain_of(rcpt)?;
    Some((rcpt, q.context.or(q.pool)))
}

fn admission_answer(admission: Admission, scratch: &mut String) -> Answer<'_> {
    match admission {
        Admission::Default => {
            m::decision("transport", "default");
            Answer::not_found()
        }
        Admission::Route { transport, nexthop } => {
            m::decision("transport", "route");
            let r = put(scratch, format_args!("{transport}:{nexthop}"));
            Answer::action(&scratch[r])
        }
        Admission::Hold {
            retry_after,
            reason,
        } => {
            m::decision(
                "transport",
                match reason {
                    Hold::Paced { .. } => "hold_paced",
                    Hold::Suspended { .. } => "hold_suspended",
                    Hold::Warmup { .. } => "hold_warmup",
                },
            );
            let r = match reason {
                Hold::Paced { rate } => put(
                    scratch,
                    format_args!(
                        "retry:4.7.0 mxpace: paced at {rate} msg/s, next slot in {retry_after}s"
                    ),
                ),
                Hold::Suspended { until } => put(
                    scratch,
                    format_args!(
                        "retry:4.7.0 mxpace: destination suspended until {}",
                        format_unix(until)
                    ),
                ),
                Hold::Warmup { limit } => put(
                    scratch,
                    format_args!(
                        "retry:4.7.0 mxpace: warm-up limit of {limit} messages today reached"
                    ),
                ),
            };
            Answer::action(&scratch[r])
        }
    }
}

/// The recipient a RCPT-stage rejection names, as many MTAs write it:
/// `host … said: 550 5.1.1 <user@example.com>: Recipient address rejected: … (in reply to
/// RCPT TO command)`. Postfix's status filter key names no recipient, so this is the
/// only way a hard bounce seen there can reach the suppression list.
fn recipient_in_reply(text: &str) -> Option<&str> {
    if !text.ends_with("(in reply to RCPT TO command)") {
        return None;
    }
    let rest = &text[text.find(" said: ")? + 7..];
    let open = rest.find('<')?;
    let len = rest[open + 1..].find('>')?;
    let addr = &rest[open + 1..open + 1 + len];
    let (local, domain) = addr.rsplit_once('@')?;
    (!local.is_empty() && domain.contains('.') && !addr.contains(char::is_whitespace))
        .then_some(addr)
}

fn report_input<'a>(q: &Query<'a>) -> ReportInput<'a> {
    let recipient = match q.kind {
        Kind::StatusLookup => q.recipient.or_else(|| q.reply.and_then(recipient_in_reply)),
        _ => q.recipient,
    };
    ReportInput {
        reply: q.reply.unwrap_or(""),
        status: q.status,
        recipient,
        sender: q.sender,
        mx_host: q.mx_host,
        source_ip: q.source_ip,
        pool: q.pool,
        dkim_domain: None,
        site_hint: q.context.map(|c| c.split('/').next().unwrap_or(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        let mut config = Config::builtin();
        config.state.backend = "memory".into();
        let config = Arc::new(config);
        let engine = Arc::new(Engine::new(
            config.clone(),
            Arc::new(crate::classify::Classifier::builtin()),
            crate::shaping::EngineClock::fake(1_700_000_000),
        ));
        let store = Store::open(&config, &engine, false).unwrap();
        Service::new(engine, config, store)
    }

    #[test]
    fn answers_use_the_policy_vocabulary_and_name_the_provider() {
        let svc = service();
        let report = |recipient, reply| Query {
            kind: Kind::DeliveryReport,
            name: "delivery_report",
            recipient: Some(recipient),
            reply: Some(reply),
            ..Query::default()
        };
        let query = |recipient| Query {
            kind: Kind::DestinationQuery,
            name: "destination_query",
            recipient: Some(recipient),
            ..Query::default()
        };
        // (request, action, provider)
        let cases: &[(Query<'_>, &str, Option<&str>)] = &[
            // The reply names no provider; the recipient's domain does.
            (report("a@gmail.com", "250 2.0.0 OK"), "DUNNO", Some("gmail")),
            (report("a@yahoo.com", "250 ok"), "DUNNO", Some("yahoo")),
            (report("a@example.com", "250 ok"), "DUNNO", None),
            (
                report("a@gmail.com", "421-4.7.28 Gmail has detected an unusual rate of unsolicited email 421 4.7.28 originating from your IP address. Try again later."),
                "DEFER",
                Some("gmail"),
            ),
            (query("someone@gmail.com"), "DUNNO", Some("gmail")),
            (query("outlook.com"), "DUNNO", Some("microsoft")),
            (query("someone@example.com"), "DUNNO", None),
        ];
        for (q, action, provider) in cases {
            let mut scratch = String::new();
            let a = svc.handle(q, &mut scratch, &mut Outcome::default());
            assert_eq!(a.reply, Reply::Action(action), "{q:?}");
            assert_eq!(a.provider, *provider, "{q:?}");
        }
    }

    #[test]
    fn action_words() {
        let cases = [
            (Action::Ok, "DUNNO"),
            (Action::Retry, "DEFER"),
            (Action::Bounce, "REJECT"),
        ];
        for (action, word) in cases {
            assert_eq!(action_word(action), word);
        }
    }

    #[test]
    fn recipient_named_by_a_rcpt_rejection() {
        let said = "host mx.example.net[192.0.2.7] said: ";
        let cases = [
            ("550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)", Some("bob@example.net")),
            ("550-5.1.1 <a.b+c@example.net> unknown 550 5.1.1 user (in reply to RCPT TO command)", Some("a.b+c@example.net")),
            // Not at RCPT, no address, or not an address in the brackets.
            ("550 5.1.1 <bob@example.net>: unknown (in reply to end of DATA command)", None),
            ("550 5.1.1 The email account that you tried to reach does not exist. (in reply to RCPT TO command)", None),
            ("550 5.7.1 <[192.0.2.1]>: Client host rejected (in reply to RCPT TO command)", None),
            ("550 5.1.1 <postmaster>: unknown (in reply to RCPT TO command)", None),
        ];
        for (reply, want) in cases {
            assert_eq!(
                recipient_in_reply(&format!("{said}{reply}")),
                want,
                "{reply}"
            );
        }
        assert_eq!(
            recipient_in_reply("<bob@example.net> (in reply to RCPT TO command)"),
            None,
            "no remote reply"
        );
    }

    #[test]
    fn unix_time_format() {
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }
}
