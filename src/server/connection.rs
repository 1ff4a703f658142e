//! One client connection: detect its protocol, then answer pipelined requests in order.
//!
//! Every read is bounded by a timeout (idle between requests, `request_timeout` once a
//! request has started), every frame by the codec's limits, and answers are flushed
//! once the pipeline is drained, so a burst of requests costs one write.

use super::service::{Outcome, Service};
use crate::config::ListenerProtocol;
use crate::metrics as m;
use crate::protocol::{detect, Answer, Codec, Detected, Limits, Protocol};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Framed, FramedParts};
use tokio_util::sync::CancellationToken;

/// Bytes read before giving up on recognising a protocol.
const DETECT_MAX: usize = 64;

pub struct ConnConfig {
    pub protocol: ListenerProtocol,
    pub limits: Limits,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
}

/// Reads until the first bytes say which protocol the client speaks.
async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    cfg: &ConnConfig,
) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + cfg.idle_timeout;
    loop {
        match detect(buf) {
            Detected::Protocol(p) => return Some(p),
            Detected::Unknown => {
                m::protocol_error("unknown", "unrecognised_protocol");
                tracing::warn!(head = %String::from_utf8_lossy(&buf[..buf.len().min(32)]), "connection closed: unrecognised protocol");
                return None;
            }
            Detected::NeedMore if buf.len() >= DETECT_MAX => {
                m::protocol_error("unknown", "unrecognised_protocol");
                return None;
            }
            Detected::NeedMore => {}
        }
        let n = tokio::time::timeout_at(deadline, io.read_buf(buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

pub async fn serve_connection<S>(
    mut io: S,
    service: Arc<Service>,
    cfg: Arc<ConnConfig>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = BytesMut::with_capacity(4096);
    let protocol = match cfg.protocol {
        ListenerProtocol::Policy => Protocol::Policy,
        ListenerProtocol::Socketmap => Protocol::Socketmap,
        ListenerProtocol::Jsonl => Protocol::JsonLines,
        ListenerProtocol::Auto => {
            let sniffed = tokio::select! {
                p = sniff(&mut io, &mut head, &cfg) => p,
                _ = shutdown.cancelled() => None,
            };
            match sniffed {
                Some(p) => p,
                None => {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    };
    let label = protocol.as_str();
    let _open = m::ConnectionGuard::new(label);
    // from_parts marks pre-read bytes as readable, so they are decoded before reading more.
    let mut parts = FramedParts::new::<&Answer<'_>>(io, Codec::new(protocol, &cfg.limits));
    parts.read_buf = head;
    let mut framed = Framed::from_parts(parts);
    let mut scratch = String::with_capacity(256);
    loop {
        let timeout = if framed.read_buffer().is_empty() {
            cfg.idle_timeout
        } else {
            cfg.request_timeout
        };
        let next = tokio::select! {
            n = tokio::time::timeout(timeout, framed.next()) => n,
            _ = shutdown.cancelled() => break,
        };
        let item = match next {
            Err(_) => {
                if !framed.read_buffer().is_empty() {
                    m::protocol_error(label, "request_timeout");
                    tracing::warn!(
                        protocol = label,
                        "connection closed: request not completed in time (slow client)"
                    );
                } else {
                    m::protocol_error(label, "idle_timeout");
                    tracing::debug!(protocol = label, "connection closed: idle");
                }
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!(protocol = label, error = %e, "connection read error");
                break;
            }
            Ok(Some(Ok(item))) => item,
        };
        let started = Instant::now();
        let mut fatal = false;
        let sent = match item {
            Err(err) => {
                m::protocol_error(label, err.kind());
                tracing::warn!(protocol = label, error = %err, "bad request answered with an error reply");
                fatal = err.is_fatal();
                framed.feed(&Answer::for_error(&err)).await
            }
            Ok(frame) => match frame.parse() {
                Err(err) => {
                    m::protocol_error(label, err.kind());
                    tracing::warn!(protocol = label, error = %err, "bad request answered with an error reply");
                    framed.feed(&Answer::for_error(&err)).await
                }
                Ok(request) => {
                    let query = request.query();
                    let mut outcome = Outcome::default();
                    let answer = service
                        .handle_async(&query, &mut scratch, &mut outcome)
                        .await;
                    if matches!(query.kind, crate::protocol::Kind::Unknown) {
                        m::protocol_error(label, "unknown_request");
                        tracing::warn!(
                            protocol = label,
                            request = query.name,
                            "unknown request type"
                        );
                    }
                    if outcome.durable {
                        // Promised state (suppression, suspension) is on disk before the MTA hears of it.
                        service.store.sync().await;
                    }
                    m::request(label, query.kind.as_str(), started.elapsed());
                    framed.feed(&answer).await
                }
            },
        };
        if sent.is_err() {
            break;
        }
        // Flush when the pipeline is drained (or the write buffer grows large).
        if (framed.read_buffer().is_empty() || framed.write_buffer().len() > 64 * 1024 || fatal)
            && framed.flush().await.is_err()
        {
            break;
        }
        if fatal {
            break;
        }
    }
    let _ = framed.flush().await;
    let _ = framed.get_mut().shutdown().await;
}
