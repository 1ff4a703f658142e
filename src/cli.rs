//! Command-line front ends that are not the daemon: `check-config`, `postfix-config`, `ctl`.

use crate::admin::{self, Request, Response, SuppressionRow};
use crate::config::Config;
use crate::server::service::format_unix;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXIT_CONFIG: u8 = 64;

pub fn check_config(file: &Path) -> ExitCode {
    let result = Config::from_file(file)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            crate::daemon::load_classifier(&c)
                .map(|_| c)
                .map_err(|e| format!("{e:#}"))
        });
    match result {
        Ok(c) => {
            println!(
                "{}: ok ({} listener(s), {} tier(s), {} provider section(s))",
                file.display(),
                c.server.listeners.len(),
                c.tiers.len(),
                c.providers.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct PostfixConfigArgs {
    /// Config file; the embedded default when omitted.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How Postfix reaches mxpace for socketmap lookups (`inet:127.0.0.1:PORT` or `unix:/path`).
    #[arg(long)]
    pub socketmap_endpoint: Option<String>,
    /// How smtpd reaches mxpace for policy requests.
    #[arg(long)]
    pub policy_endpoint: Option<String>,
    /// Print only the main.cf part.
    #[arg(long, conflicts_with = "master")]
    pub main: bool,
    /// Print only the master.cf part.
    #[arg(long)]
    pub master: bool,
}

pub fn postfix_config(a: PostfixConfigArgs) -> ExitCode {
    let config = match &a.config {
        Some(p) => Config::from_file(p),
        None => Ok(Config::builtin()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let classifier = match crate::daemon::load_classifier(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let g = crate::postfix::generate(
        &config,
        &classifier,
        &crate::postfix::Endpoints {
            socketmap: a.socketmap_endpoint,
            policy: a.policy_endpoint,
        },
    );
    if !a.master {
        print!("{}", g.main_cf);
    }
    if !a.main {
        if !a.master {
            println!();
        }
        print!("{}", g.master_cf);
    }
    ExitCode::SUCCESS
}

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Admin address of the daemon; default: `[admin] listen` of --config or the embedded default.
    #[arg(long)]
    pub admin: Option<String>,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the daemon's JSON response instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Table of destinations: stage, rate, concurrency, suspended until, last replies.
    Status,
    /// Limits and state of one site (provider name or recipient domain).
    Query { name: String },
    /// Suspend a site: its mail waits in the deferred queue.
    Suspend {
        site: String,
        /// How long, e.g. 30m (default: the site's suspend_for).
        #[arg(long = "for")]
        duration: Option<String>,
    },
    /// Lift a site's suspension; it resumes at its floor rate.
    Resume { site: String },
    /// Remove an address from the suppression list.
    Unsuppress { address: String },
    /// Write the suppression list as CSV (address,since,class,reply) to FILE or stdout.
    ExportSuppressions { file: Option<PathBuf> },
    /// Read suppressions from a CSV file written by export-suppressions.
    ImportSuppressions { file: PathBuf },
}

fn admin_addr(a: &CtlArgs) -> Result<String, String> {
    if let Some(addr) = &a.admin {
        return Ok(addr.clone());
    }
    let config = match &a.config {
        Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
        None => Config::builtin(),
    };
    Ok(config.admin.listen)
}

pub fn ctl(a: CtlArgs) -> ExitCode {
    let addr = match admin_addr(&a) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let req = match &a.command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Query { name } => Request::Query { name: name.clone() },
        CtlCommand::Suspend { site, duration } => Request::Suspend {
            site: site.clone(),
            duration: duration.clone(),
        },
        CtlCommand::Resume { site } => Request::Resume { site: site.clone() },
        CtlCommand::Unsuppress { address } => Request::Unsuppress {
            address: address.clone(),
        },
        CtlCommand::ExportSuppressions { .. } => Request::Suppressions,
        CtlCommand::ImportSuppressions { file } => match read_csv(file) {
            Ok(entries) => Request::Import { entries },
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let resp = match rt.block_on(admin::call(&addr, &req)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxpace ctl: cannot reach the daemon at {addr}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !resp.ok {
        eprintln!("mxpace ctl: {}", resp.error.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    match &a.command {
        CtlCommand::Status | CtlCommand::Query { .. } => print_status(&resp),
        CtlCommand::ExportSuppressions { file } => {
            if let Err(e) = write_csv(file.as_deref(), &resp.suppressions) {
                eprintln!("mxpace ctl: {e}");
                return ExitCode::FAILURE;
            }
        }
        _ => println!("{}", resp.message.unwrap_or_default()),
    }
    ExitCode::SUCCESS
}

fn print_status(r: &Response) {
    println!(
        "{:<24} {:<20} {:<11} {:<6} {:>8} {:>5} {:>24} {:>6} {:>6} {:>6} {:>6}",
        "SITE",
        "IDENTITY",
        "STAGE",
        "TIER",
        "RATE/s",
        "CONC",
        "SUSPENDED UNTIL",
        "OK",
        "DEFER",
        "THROT",
        "REJ"
    );
    for d in &r.destinations {
        println!(
            "{:<24} {:<20} {:<11} {:<6} {:>8} {:>5} {:>24} {:>6} {:>6} {:>6} {:>6}",
            d.site,
            d.identity,
            d.stage.as_str(),
            d.tier,
            d.rate,
            d.concurrency,
            d.suspended_until
                .map(format_unix)
                .unwrap_or_else(|| "-".into()),
            d.counts[0],
            d.counts[1],
            d.counts[2],
            d.counts[3]
        );
    }
    if !r.recent.is_empty() {
        println!("\nLAST REPLIES");
        for x in r.recent.iter().rev().take(20) {
            println!(
                "{}  {:<16} {:<18} {}",
                format_unix(x.at),
                x.site,
                x.class.as_str(),
                x.reply
            );
        }
    }
}

fn write_csv(file: Option<&Path>, rows: &[SuppressionRow]) -> Result<(), String> {
    let out: Box<dyn Write> = match file {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => Box::new(std::io::stdout()),
    };
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["address", "since", "class", "reply"])
        .map_err(|e| e.to_string())?;
    for r in rows {
        w.write_record([
            r.address.as_str(),
            &r.since.to_string(),
            r.class.as_str(),
            r.reply.as_str(),
        ])
        .map_err(|e| e.to_string())?;
    }
    w.flush().map_err(|e| e.to_string())
}

fn read_csv(file: &Path) -> Result<Vec<SuppressionRow>, String> {
    let mut r = csv::Reader::from_path(file).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| format!("line {}: {e}", i + 2))?;
        let field = |n: usize| rec.get(n).unwrap_or("").to_string();
        let since = field(1)
            .parse()
            .map_err(|_| format!("line {}: `since` must be Unix seconds", i + 2))?;
        rows.push(SuppressionRow {
            address: field(0),
            since,
            class: field(2),
            reply: field(3),
        });
    }
    Ok(rows)
}
