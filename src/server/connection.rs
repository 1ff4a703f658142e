//! One client connection: detect its protocol, then answer pipelined requests in order.
//!
//! Every read is bounded by a deadline ([`Timed`]: `idle_timeout` until the first byte
//! of a request, `request_timeout` from that byte until the request is complete), every
//! write by `request_timeout`, every frame by the codec's limits, and answers are
//! flushed once the pipeline is drained, so a burst of requests costs one write.

use super::service::{Outcome, Service};
use crate::config::ListenerProtocol;
use crate::metrics as m;
use crate::protocol::{detect, Answer, Codec, Detected, Limits, Protocol};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;
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

/// Which deadline of [`Timed`] ran out.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request started within `idle_timeout`.
    Idle,
    /// A request started but was not complete within `request_timeout` (slow client).
    Request,
}

impl Expired {
    fn kind(self) -> &'static str {
        match self {
            Expired::Idle => "idle_timeout",
            Expired::Request => "request_timeout",
        }
    }
}

/// The connection's stream with a read deadline that follows the request cycle.
///
/// A timeout around each `next()` cannot tell idle time from a slow request: the
/// frame being waited for may not have started yet. Here the first byte read while
/// idle switches to `request_timeout`, so a client that trickles a request a byte at
/// a time is cut off after `request_timeout`, not after `idle_timeout`. An expired
/// deadline is a `TimedOut` read error; [`Timed::expired`] says which one.
pub struct Timed<S> {
    io: S,
    idle_timeout: Duration,
    request_timeout: Duration,
    /// No byte of the next request has arrived yet.
    idle: bool,
    deadline: Pin<Box<Sleep>>,
    expired: Option<Expired>,
}

impl<S> Timed<S> {
    pub fn new(io: S, idle_timeout: Duration, request_timeout: Duration) -> Timed<S> {
        Timed {
            io,
            idle_timeout,
            request_timeout,
            idle: true,
            deadline: Box::pin(tokio::time::sleep(idle_timeout)),
            expired: None,
        }
    }

    /// Waits for a new request: `idle_timeout` until its first byte.
    pub fn expect_request(&mut self) {
        self.idle = true;
        let at = tokio::time::Instant::now() + self.idle_timeout;
        self.deadline.as_mut().reset(at);
    }

    /// A request is under way (bytes of it are buffered): `request_timeout` from now.
    pub fn request_started(&mut self) {
        self.idle = false;
        let at = tokio::time::Instant::now() + self.request_timeout;
        self.deadline.as_mut().reset(at);
    }

    /// The deadline that ended the connection, if one did.
    pub fn expired(&self) -> Option<Expired> {
        self.expired
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired = Some(if this.idle {
                Expired::Idle
            } else {
                Expired::Request
            });
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.idle && buf.filled().len() > before {
            this.request_started();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Reads until the first bytes say which protocol the client speaks.
async fn sniff<S: AsyncRead + Unpin>(io: &mut Timed<S>, buf: &mut BytesMut) -> Option<Protocol> {
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
        match io.read_buf(buf).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(_) => {
                if let Some(e) = io.expired() {
                    m::protocol_error("unknown", e.kind());
                    tracing::debug!(
                        reason = e.kind(),
                        "connection closed before its protocol was known"
                    );
                }
                return None;
            }
        }
    }
}

pub async fn serve_connection<S>(
    io: S,
    service: Arc<Service>,
    cfg: Arc<ConnConfig>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = Timed::new(io, cfg.idle_timeout, cfg.request_timeout);
    let mut head = BytesMut::with_capacity(4096);
    let protocol = match cfg.protocol {
        ListenerProtocol::Policy => Protocol::Policy,
        ListenerProtocol::Socketmap => Protocol::Socketmap,
        ListenerProtocol::Jsonl => Protocol::JsonLines,
        ListenerProtocol::Auto => {
            let sniffed = tokio::select! {
                p = sniff(&mut io, &mut head) => p,
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
    // Bytes left by protocol detection are a request under way: its clock is running.
    let mut first = true;
    let mut writable = true;
    loop {
        if framed.read_buffer().is_empty() {
            framed.get_mut().expect_request();
        } else if !first {
            framed.get_mut().request_started();
        }
        first = false;
        // Biased: on shutdown, requests the client has already sent are still answered;
        // the connection closes once nothing more is readable at once.
        let next = tokio::select! {
            biased;
            n = framed.next() => n,
            _ = shutdown.cancelled() => break,
        };
        let item = match next {
            None => break,
            Some(Err(e)) => {
                match framed.get_ref().expired() {
                    Some(Expired::Request) => {
                        m::protocol_error(label, "request_timeout");
                        tracing::warn!(
                            protocol = label,
                            "connection closed: request not completed in time (slow client)"
                        );
                    }
                    Some(Expired::Idle) => {
                        m::protocol_error(label, "idle_timeout");
                        tracing::debug!(protocol = label, "connection closed: idle");
                    }
                    None => {
                        tracing::debug!(protocol = label, error = %e, "connection read error")
                    }
                }
                break;
            }
            Some(Ok(item)) => item,
        };
        let started = Instant::now();
        let mut fatal = false;
        let sent = match item {
            Err(err) => {
                m::protocol_error(label, err.kind());
                tracing::warn!(protocol = label, error = %err, "bad request answered with an error reply");
                fatal = err.is_fatal();
                send(
                    &mut framed,
                    &Answer::for_error(&err),
                    label,
                    cfg.request_timeout,
                )
                .await
            }
            Ok(frame) => match frame.parse() {
                Err(err) => {
                    m::protocol_error(label, err.kind());
                    tracing::warn!(protocol = label, error = %err, "bad request answered with an error reply");
                    send(
                        &mut framed,
                        &Answer::for_error(&err),
                        label,
                        cfg.request_timeout,
                    )
                    .await
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
                    send(&mut framed, &answer, label, cfg.request_timeout).await
                }
            },
        };
        writable = sent;
        // Flush when the pipeline is drained (or the write buffer grows large).
        let drained = framed.read_buffer().is_empty() || framed.write_buffer().len() > 64 * 1024;
        if writable && (drained || fatal) {
            writable = flush(&mut framed, label, cfg.request_timeout).await;
        }
        if !writable || fatal {
            break;
        }
    }
    // A stream that failed a write (or timed out on one) gets no second wait.
    if writable && flush(&mut framed, label, cfg.request_timeout).await {
        let _ = tokio::time::timeout(cfg.request_timeout, framed.get_mut().shutdown()).await;
    }
}

/// Queues one answer. Past the write buffer's backpressure boundary this writes too,
/// so it is bounded like [`flush`].
async fn send<S: AsyncWrite + Unpin>(
    framed: &mut Framed<Timed<S>, Codec>,
    answer: &Answer<'_>,
    label: &'static str,
    limit: Duration,
) -> bool {
    write_outcome(
        tokio::time::timeout(limit, framed.feed(answer)).await,
        label,
    )
}

/// Writes buffered answers out within `limit`: a client that stops reading its
/// answers must not hold a connection (and a connection permit) forever.
async fn flush<S: AsyncWrite + Unpin>(
    framed: &mut Framed<Timed<S>, Codec>,
    label: &'static str,
    limit: Duration,
) -> bool {
    write_outcome(
        tokio::time::timeout(limit, SinkExt::<&Answer<'_>>::flush(framed)).await,
        label,
    )
}

fn write_outcome(
    r: Result<io::Result<()>, tokio::time::error::Elapsed>,
    label: &'static str,
) -> bool {
    match r {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(protocol = label, error = %e, "connection write error");
            false
        }
        Err(_) => {
            m::protocol_error(label, "write_timeout");
            tracing::warn!(
                protocol = label,
                "connection closed: answers not read in time (slow client)"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt};

    /// Reads through a [`Timed`] stream while the client writes `script`
    /// (`(milliseconds to wait, bytes)`) and then falls silent; returns which
    /// deadline ended it and after how many bytes.
    async fn run(script: &[(u64, &[u8])], expect_request_after: Option<usize>) -> (Expired, usize) {
        let (mut client, server) = duplex(1024);
        let mut timed = Timed::new(server, Duration::from_secs(10), Duration::from_secs(1));
        let script: Vec<(u64, Vec<u8>)> = script.iter().map(|(t, b)| (*t, b.to_vec())).collect();
        let writer = tokio::spawn(async move {
            for (wait, bytes) in script {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                client.write_all(&bytes).await.unwrap();
            }
            // Keep the stream open: only a deadline may end the read.
            std::future::pending::<()>().await;
        });
        let mut buf = BytesMut::new();
        let mut read = 0;
        loop {
            if Some(read) == expect_request_after {
                timed.expect_request();
            }
            match timed.read_buf(&mut buf).await {
                Ok(n) => read += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    writer.abort();
                    return (timed.expired().unwrap(), read);
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_request_cycle() {
        // (script, expect a new request after N bytes, expired, bytes read)
        type Case = (
            &'static [(u64, &'static [u8])],
            Option<usize>,
            Expired,
            usize,
        );
        let cases: &[Case] = &[
            // Silence: the idle deadline.
            (&[], None, Expired::Idle, 0),
            // Idle for 9 s, then a request starts and stalls: request_timeout after it.
            (&[(9_000, b"req")], None, Expired::Request, 3),
            // A byte every 300 ms never completes: cut off 1 s after the first byte,
            // although no gap reaches either timeout.
            (
                &[
                    (0, b"r"),
                    (300, b"e"),
                    (300, b"q"),
                    (300, b"u"),
                    (300, b"e"),
                ],
                None,
                Expired::Request,
                4,
            ),
            // After a whole request the clock is back to idle: 5 s of silence is fine,
            // then the next request trickles and is cut off.
            (
                &[(0, b"ab"), (5_000, b"c"), (600, b"d"), (600, b"e")],
                Some(2),
                Expired::Request,
                4,
            ),
        ];
        for (script, reset, expired, read) in cases {
            assert_eq!(run(script, *reset).await, (*expired, *read), "{script:?}");
        }
    }
}
