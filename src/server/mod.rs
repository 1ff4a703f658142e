//! Listeners and connections: sockets in, answers out.
//!
//! - [`listener`]: binding TCP and Unix sockets.
//! - [`connection`]: protocol detection, framing, timeouts, pipelining.
//! - [`service`]: dispatching a request to the engine and building its answer.

pub mod connection;
pub mod listener;
pub mod service;

use connection::{serve_connection, ConnConfig};
use listener::{Bound, BoundListener};
use service::Service;
use std::sync::Arc;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts on every listener until `shutdown`, then waits for open connections
/// (which finish their current request) through `tracker`. `conn` is asked for each
/// new connection, so that a reloaded config's limits and timeouts apply to it.
pub fn spawn_listeners(
    listeners: Vec<BoundListener>,
    service: Arc<Service>,
    conn: impl Fn(&BoundListener) -> ConnConfig + Send + Sync + 'static,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    // One cap over all listeners: connections beyond it wait in the kernel backlog.
    let permits = Arc::new(Semaphore::new(max_connections));
    let conn = Arc::new(conn);
    for l in listeners {
        let conn = conn.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        let permits = permits.clone();
        let t = tracker.clone();
        tracker.spawn(async move {
            loop {
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(TryAcquireError::Closed) => break,
                    Err(TryAcquireError::NoPermits) => {
                        crate::metrics::connection_limit_wait();
                        tracing::warn!(
                            max_connections,
                            "connection cap reached: new connections wait in the listen backlog"
                        );
                        tokio::select! {
                            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                            _ = shutdown.cancelled() => break,
                        }
                    }
                };
                macro_rules! serve {
                    ($accepted:expr) => {
                        match $accepted {
                            Ok((io, _)) => {
                                let cfg = Arc::new(conn(&l));
                                let (service, shutdown) = (service.clone(), shutdown.clone());
                                t.spawn(async move {
                                    serve_connection(io, service, cfg, shutdown).await;
                                    drop(permit);
                                });
                            }
                            Err(e) => {
                                // EMFILE and friends: back off briefly instead of spinning.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    };
                }
                match &l.listener {
                    Bound::Tcp(tcp) => {
                        let accepted = tokio::select! {
                            a = tcp.accept() => a,
                            _ = shutdown.cancelled() => break,
                        };
                        if let Ok((s, _)) = &accepted {
                            let _ = s.set_nodelay(true);
                        }
                        serve!(accepted)
                    }
                    Bound::Unix(unix, _) => {
                        let accepted = tokio::select! {
                            a = unix.accept() => a,
                            _ = shutdown.cancelled() => break,
                        };
                        serve!(accepted)
                    }
                }
            }
            if let Bound::Unix(_, path) = &l.listener {
                let _ = std::fs::remove_file(path);
            }
        });
    }
}
