//! The operator interface behind `mxpace ctl`: JSON lines on a local-only socket.
//!
//! One request object per line, one response object per line:
//! `{"cmd":"status"}`, `{"cmd":"suspend","site":"yahoo","for":"30m"}`,
//! `{"cmd":"resume","site":"yahoo"}`, `{"cmd":"unsuppress","address":"a@b"}`,
//! `{"cmd":"suppressions"}`, `{"cmd":"import","entries":[…]}`, `{"cmd":"query","name":"gmail"}`.

use crate::config::duration::parse_duration;
use crate::config::{parse_listen_address, ListenAddress};
use crate::shaping::engine::RecentReply;
use crate::shaping::suppress::{clip_reply, Suppression};
use crate::shaping::{DestinationView, Engine};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

/// Longest admin request line (an import of many suppressions is sent in chunks).
const MAX_LINE: usize = 8 * 1024 * 1024;

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Query {
        name: String,
    },
    Suspend {
        site: String,
        #[serde(rename = "for", default)]
        duration: Option<String>,
    },
    Resume {
        site: String,
    },
    Unsuppress {
        address: String,
    },
    Suppressions,
    Import {
        entries: Vec<SuppressionRow>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SuppressionRow {
    pub address: String,
    pub since: u64,
    pub class: String,
    pub reply: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestinationView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<RecentReply>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suppressions: Vec<SuppressionRow>,
}

impl Response {
    fn err(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(e.into()),
            ..Default::default()
        }
    }
    fn msg(m: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: Some(m.into()),
            ..Default::default()
        }
    }
}

/// Admin listeners must not be reachable from other hosts.
pub fn check_local(addr: &str) -> Result<ListenAddress, String> {
    let a = parse_listen_address(addr)?;
    if let ListenAddress::Tcp(sa) = &a {
        if !sa.ip().is_loopback() {
            return Err(format!(
                "{addr}: the admin interface listens on loopback or a unix socket only"
            ));
        }
    }
    Ok(a)
}

pub async fn handle(engine: &Engine, store: &Store, req: Request) -> Response {
    match req {
        Request::Status => Response {
            ok: true,
            destinations: engine.destinations(),
            recent: engine.recent_replies(),
            ..Default::default()
        },
        Request::Query { name } => Response {
            ok: true,
            destinations: engine.query(&name),
            ..Default::default()
        },
        Request::Suspend { site, duration } => {
            let secs = match duration.as_deref().map(parse_duration) {
                None => engine
                    .setup()
                    .config
                    .shaping
                    .defaults
                    .suspend_for
                    .get()
                    .as_secs(),
                Some(Ok(d)) => d.as_secs(),
                Some(Err(e)) => return Response::err(e),
            };
            match engine.suspend(&site, secs.min(u32::MAX as u64) as u32) {
                Ok(name) => {
                    store.sync().await;
                    Response::msg(format!("{name} suspended for {secs}s"))
                }
                Err(e) => Response::err(e),
            }
        }
        Request::Resume { site } => match engine.resume(&site) {
            Ok(name) => {
                store.sync().await;
                Response::msg(format!("{name} resumed"))
            }
            Err(e) => Response::err(e),
        },
        Request::Unsuppress { address } => match engine.unsuppress(&address) {
            Some(_) => {
                store.sync().await;
                Response::msg(format!("{address} removed from the suppression list"))
            }
            None => Response::err(format!("{address} is not suppressed")),
        },
        Request::Suppressions => Response {
            ok: true,
            suppressions: engine
                .suppressions()
                .into_iter()
                .map(|(address, s)| SuppressionRow {
                    address,
                    since: s.since,
                    class: s.class.as_str().to_string(),
                    reply: s.reply,
                })
                .collect(),
            ..Default::default()
        },
        Request::Import { entries } => {
            let mut added = 0;
            for row in entries {
                let Some(class) = crate::classify::Class::parse(&row.class) else {
                    return Response::err(format!(
                        "{}: unknown class {:?}",
                        row.address, row.class
                    ));
                };
                let entry = Suppression {
                    since: row.since,
                    class,
                    reply: clip_reply(&row.reply),
                };
                if engine.suppress(&row.address, entry) {
                    added += 1;
                }
            }
            store.sync().await;
            Response::msg(format!("{added} suppressions imported"))
        }
    }
}

async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(io: S, engine: Arc<Engine>, store: Store) {
    let (r, mut w) = tokio::io::split(io);
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64);
        match limited.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(&engine, &store, req).await,
            Err(e) => Response::err(format!("bad admin request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            break;
        }
    }
}

use tokio::io::AsyncReadExt;

/// Binds the admin listener and serves it until `shutdown`.
pub async fn spawn(
    addr: &str,
    engine: Arc<Engine>,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<String> {
    let listener = match check_local(addr).map_err(anyhow::Error::msg)? {
        ListenAddress::Tcp(sa) => AdminListener::Tcp(TcpListener::bind(sa).await?),
        ListenAddress::Unix(path) => {
            // The same care as the service sockets: only a stale socket is replaced.
            crate::server::listener::remove_stale_socket(&path)?;
            let l = UnixListener::bind(&path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            AdminListener::Unix(l, path)
        }
    };
    let local = match &listener {
        AdminListener::Tcp(l) => l.local_addr()?.to_string(),
        AdminListener::Unix(_, path) => format!("unix:{}", path.display()),
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = listener.accept_one(&engine, &store) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if let AdminListener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    });
    Ok(local)
}

enum AdminListener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl AdminListener {
    /// Accepts one client and serves it on its own task.
    async fn accept_one(&self, engine: &Arc<Engine>, store: &Store) {
        match self {
            AdminListener::Tcp(l) => match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_client(s, engine.clone(), store.clone()));
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "admin accept failed"),
            },
            AdminListener::Unix(l, _) => match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_client(s, engine.clone(), store.clone()));
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "admin accept failed"),
            },
        }
        // EMFILE and friends: back off briefly instead of spinning.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Client side: one request, one response.
pub async fn call(addr: &str, req: &Request) -> anyhow::Result<Response> {
    let a = parse_listen_address(addr).map_err(anyhow::Error::msg)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
        s: S,
        line: &[u8],
    ) -> anyhow::Result<Response> {
        let (r, mut w) = tokio::io::split(s);
        w.write_all(line).await?;
        let mut reader = BufReader::new(r);
        let mut resp = String::new();
        reader.read_line(&mut resp).await?;
        Ok(serde_json::from_str(&resp)?)
    }
    match a {
        ListenAddress::Tcp(sa) => roundtrip(tokio::net::TcpStream::connect(sa).await?, &line).await,
        ListenAddress::Unix(p) => roundtrip(tokio::net::UnixStream::connect(p).await?, &line).await,
    }
}
