//! `mxpace classify`: the bounce-code lookup operators use by hand, and a filter for logs.

use super::{Classifier, Hints, Verdict};
use clap::Args as ClapArgs;
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for a refused rules file (EX_DATAERR-style config error, as `sysexits.h` 64).
pub const EXIT_BAD_RULES: u8 = 64;

/// Classify SMTP replies: from the arguments, or one per line from standard input.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct Args {
    /// One JSON object per reply.
    #[arg(long)]
    pub json: bool,
    /// Show the parsed parts, the deciding rule and the next step.
    #[arg(long)]
    pub explain: bool,
    /// Extra rule file layered over the built-in rules (repeatable); a file named like a
    /// built-in one (e.g. `gmail.toml`) replaces it.
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// The MX host that gave the replies, when known.
    #[arg(long = "mx-host", value_name = "HOST")]
    pub mx_host: Option<String>,
    /// The enhanced status code the MTA attached (e.g. Postfix `dsn=`).
    #[arg(long, value_name = "X.Y.Z")]
    pub status: Option<String>,
    /// Replies to classify; standard input (one per line) when none are given.
    #[arg(value_name = "REPLY")]
    pub replies: Vec<String>,
}

/// Runs the subcommand; rule errors exit with [`EXIT_BAD_RULES`].
pub fn run(args: Args) -> ExitCode {
    let classifier = if args.rules.is_empty() {
        Classifier::builtin()
    } else {
        match Classifier::from_files(&args.rules) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mxpace: rules refused: {e}");
                return ExitCode::from(EXIT_BAD_RULES);
            }
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = if args.replies.is_empty() {
        let stdin = io::stdin();
        let mut status = Ok(());
        for line in stdin.lock().lines() {
            match line {
                Ok(line) => {
                    if let Err(e) = write_one(&classifier, &args, &line, &mut out) {
                        status = Err(e);
                        break;
                    }
                }
                Err(e) => {
                    status = Err(e);
                    break;
                }
            }
        }
        status
    } else {
        args.replies
            .iter()
            .try_for_each(|r| write_one(&classifier, &args, r, &mut out))
    };
    match result.and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is a normal end for a filter.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxpace: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_one(c: &Classifier, args: &Args, reply: &str, out: &mut impl Write) -> io::Result<()> {
    let hints = Hints {
        mx_host: args.mx_host.as_deref(),
        status: args.status.as_deref(),
    };
    if args.json {
        let e = c.explain(reply, hints);
        let mut obj = verdict_json(c, &e.verdict);
        let m = obj.as_object_mut().expect("object");
        if let Some(h) = e.parsed.mx_host {
            m.insert("mx_host".into(), h.into());
        }
        if let Some(ip) = e.parsed.mx_ip {
            m.insert("mx_ip".into(), ip.into());
        }
        if let Some(s) = e.parsed.stage {
            m.insert("stage".into(), s.as_str().into());
        }
        if let Some(r) = e.parsed.recipient {
            m.insert("recipient".into(), r.into());
        }
        if args.explain {
            m.insert("text".into(), e.match_text.clone().into());
            m.insert("description".into(), e.description.clone().into());
            m.insert("advice".into(), e.advice.clone().into());
        }
        m.insert("reply".into(), reply.into());
        writeln!(out, "{obj}")
    } else if args.explain {
        let e = c.explain(reply, hints);
        writeln!(out, "reply:       {reply}")?;
        write!(out, "{e}")?;
        writeln!(out)
    } else {
        let v = c.classify(reply, hints);
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        writeln!(
            out,
            "{} {} {} {}",
            v.class,
            dash(c.provider_name(v.provider)),
            v.blamed,
            dash(c.rule_id_str(v.rule))
        )
    }
}

/// The verdict as JSON (the fields other tools rely on).
pub fn verdict_json(c: &Classifier, v: &Verdict) -> serde_json::Value {
    serde_json::json!({
        "class": v.class,
        "provider": c.provider_name(v.provider),
        "blamed": v.blamed,
        "permanent": v.permanent,
        "code": v.code,
        "enhanced": v.enhanced,
        "rule": c.rule_id_str(v.rule),
    })
}
