//! Request → answer: the one place that turns a protocol-neutral query into engine calls.
//!
//! Answers borrow their dynamic text from a per-connection scratch `String`, so the
//! steady path formats into reused memory instead of allocating per request.

use crate::config::Config;
use crate::protocol::{Answer, Kind, Query, Reply};
use crate::shaping::engine::{
    domain_of, Action, Admission, Decision, Hold, PolicyVerdict, ReportInput,
};
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

/// `YYYY-MM-DD HH:MM:SS UTC` for operator-facing texts.
pub fn format_unix(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
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
                decided(q.kind, d.action.as_str());
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
                decided(q.kind, "unknown");
                Answer::unknown_request()
            }
        }
    }

    fn access_policy<'s>(&self, q: &Query<'_>, scratch: &'s mut String) -> Answer<'s> {
        let Some(rcpt) = q.recipient.filter(|r| !r.is_empty()) else {
            decided(q.kind, "dunno");
            return Answer::action("DUNNO");
        };
        let config = self.config.load();
        let verdict = self.engine.policy(rcpt, config.policy.enforce_suppression);
        decided(
            q.kind,
            match verdict {
                PolicyVerdict::Dunno => "dunno",
                PolicyVerdict::Suppressed(_) => "suppressed",
                PolicyVerdict::Suspended { .. } => "suspended",
            },
        );
        match verdict {
            PolicyVerdict::Dunno => Answer::action("DUNNO"),
            PolicyVerdict::Suppressed(s) => {
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
                let r = put(
                    scratch,
                    format_args!(
                        "{} mxpace: deliveries to {} are suspended until {} after blocks by the receiver",
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
        let provider = put(
            scratch,
            format_args!("{}", setup.classifier.provider_name(d.verdict.provider)),
        );
        let stage = d.stage.as_str();
        let _ = q;
        Answer {
            reply: Reply::Action(d.action.as_str()),
            class: Some(d.verdict.class),
            provider: Some(&scratch[provider]),
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
                    decided(q.kind, "defer_block");
                    let r = put(scratch, format_args!("4{rest} {text}"));
                    return Answer::action(&scratch[r]);
                }
            }
        }
        decided(q.kind, "unchanged");
        Answer::not_found()
    }

    fn transport_answer<'s>(&self, q: &Query<'_>, scratch: &'s mut String) -> Answer<'s> {
        let Some(rcpt) = q.recipient.or(q.key).filter(|r| domain_of(r).is_some()) else {
            decided(q.kind, "default");
            return Answer::not_found();
        };
        let pool = q.context.or(q.pool);
        let admission = self.engine.admit(rcpt, pool);
        decided(
            q.kind,
            match &admission {
                Admission::Default => "default",
                Admission::Route { .. } => "route",
                Admission::Hold { reason, .. } => match reason {
                    Hold::Paced { .. } => "hold_paced",
                    Hold::Suspended { .. } => "hold_suspended",
                    Hold::Warmup { .. } => "hold_warmup",
                },
            },
        );
        match admission {
            Admission::Default => Answer::not_found(),
            Admission::Route { transport, nexthop } => {
                let r = put(scratch, format_args!("{transport}:{nexthop}"));
                Answer::action(&scratch[r])
            }
            Admission::Hold {
                retry_after,
                reason,
            } => {
                let r = match reason {
                    Hold::Paced { rate } => put(
                        scratch,
                        format_args!("retry:4.7.0 mxpace: paced at {rate} msg/s, next slot in {retry_after}s"),
                    ),
                    Hold::Suspended { until } => put(
                        scratch,
                        format_args!(
                            "retry:4.7.0 mxpace: destination suspended until {} after blocks by the receiver",
                            format_unix(until)
                        ),
                    ),
                    Hold::Warmup { limit } => put(
                        scratch,
                        format_args!("retry:4.7.0 mxpace: warm-up limit of {limit} messages today reached"),
                    ),
                };
                Answer::action(&scratch[r])
            }
        }
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
        let site = put(
            scratch,
            format_args!("{}", view.map(|v| v.site.as_str()).unwrap_or("")),
        );
        let _ = site;
        let action = if retry > 0 { "suspended" } else { "ok" };
        decided(q.kind, action);
        Answer {
            reply: Reply::Action(action),
            class: None,
            provider: None,
            blamed: None,
            stage: Some(stage.as_str()),
            retry_after: Some(retry),
            concurrency: Some(concurrency),
            rate: Some(rate),
        }
    }
}

/// Counts the answer in `mxpace_decisions_total` (static labels: no allocation).
fn decided(kind: Kind, action: &'static str) {
    crate::metrics::decision(kind.as_str(), action);
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
