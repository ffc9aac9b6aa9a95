//! Copying both ways between the two ends of a flow (TCP sockets and HTTP/2 streams), with
//! half-close propagated, an idle timeout, a maximum lifetime, revocation, and byte counts.
//!
//! Read buffers are taken only while data moves: a flow idle after small messages holds no copy
//! buffer, so thousands of idle tunnelled connections cost little memory; a flow moving bulk
//! data keeps its partly used buffer between reads instead of allocating one per read.
#![forbid(unsafe_code)]

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
    time::Instant,
};

use super::tracker::Revocation;

/// The smallest read buffer. A read that fills its buffer doubles the next one, up to
/// [`MAX_CHUNK`], and one that fills less than a quarter halves it, so bulk transfers read big
/// chunks and chatty flows small ones.
const MIN_CHUNK: usize = 16 * 1024;

/// The largest buffer one read takes.
const MAX_CHUNK: usize = 256 * 1024;

/// Below this much spare room the next read gets a fresh buffer.
const MIN_SPARE: usize = 4 * 1024;

/// The reading end of one direction.
pub(super) trait Source {
    /// The next chunk of data, `None` at end of stream. Dropping the future before it
    /// completes consumes no data.
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// The writing end of one direction.
pub(super) trait Sink {
    /// Write all of `chunk`.
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Signal end of stream (half-close) after everything written.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Reads a TCP socket, keeping a buffer only while data is ready.
pub(super) struct TcpSource {
    read: OwnedReadHalf,
    spare: Option<BytesMut>,
    chunk: usize,
}

impl TcpSource {
    /// Reads from `read`.
    #[must_use]
    pub(super) fn new(read: OwnedReadHalf) -> Self {
        Self {
            read,
            spare: None,
            chunk: MIN_CHUNK,
        }
    }
}

impl Source for TcpSource {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let mut buf = match self.spare.take() {
            Some(buf) if buf.capacity() - buf.len() >= MIN_SPARE => buf,
            // Without a partly used buffer, wait for data before taking one.
            _ => {
                self.read.readable().await?;
                BytesMut::with_capacity(self.chunk)
            }
        };
        let room = buf.capacity() - buf.len();
        // `read_buf` (unlike `try_read_buf`) marks the socket not ready after a short read, so
        // the next wait needs no extra `recv` that fails with EAGAIN.
        let n = self.read.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if n == room {
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        } else if n < room / 4 {
            self.chunk = (self.chunk / 2).max(MIN_CHUNK);
        }
        let chunk = buf.split().freeze();
        // A flow moving bulk data keeps the rest of its buffer (no allocation per read); a
        // chatty or idle one gives it back.
        if n >= MIN_CHUNK {
            self.spare = Some(buf);
        }
        Ok(Some(chunk))
    }
}

/// Both ends of a TCP socket.
#[must_use]
pub(super) fn tcp_ends(stream: tokio::net::TcpStream) -> (TcpSource, TcpSink) {
    let (read, write) = stream.into_split();
    (TcpSource::new(read), TcpSink(write))
}

/// The socket `tcp_ends` split, whole again (to be reset).
#[must_use]
pub(super) fn tcp_whole(source: TcpSource, sink: TcpSink) -> tokio::net::TcpStream {
    source
        .read
        .reunite(sink.0)
        .expect("both ends come from one socket")
}

/// Writes a TCP socket; finishing shuts down its sending side.
pub(super) struct TcpSink(pub OwnedWriteHalf);

impl Sink for TcpSink {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.write_all(&chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

/// Reads an HTTP/2 stream's DATA frames, returning flow-control credit once the previous chunk
/// was written on (so the window bounds what is buffered).
pub(super) struct H2Source {
    recv: RecvStream,
    unreleased: usize,
}

impl H2Source {
    /// Reads from `recv`.
    #[must_use]
    pub(super) fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            unreleased: 0,
        }
    }
}

impl Source for H2Source {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.unreleased > 0 {
            self.recv
                .flow_control()
                .release_capacity(self.unreleased)
                .map_err(h2_io)?;
            self.unreleased = 0;
        }
        loop {
            match self.recv.data().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(h2_io(e)),
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    self.unreleased = chunk.len();
                    return Ok(Some(chunk));
                }
            }
        }
    }
}

/// Writes DATA frames on an HTTP/2 stream as the peer's window allows; finishing sends
/// `END_STREAM`.
pub(super) struct H2Sink(pub SendStream<Bytes>);

impl Sink for H2Sink {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.0.reserve_capacity(chunk.len());
            let granted = std::future::poll_fn(|cx| self.0.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
                .map_err(h2_io)?;
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            self.0.send_data(part, false).map_err(h2_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.send_data(Bytes::new(), true).map_err(h2_io)
    }
}

/// An HTTP/2 error as an I/O error (a reset stream reads as a reset connection).
fn h2_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if error.is_reset() || error.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::InvalidData
    };
    io::Error::new(kind, error)
}

/// Timeouts of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limits {
    /// Close when nothing moved either way for this long.
    pub idle: Option<Duration>,
    /// Close when the flow has been open this long.
    pub lifetime: Option<Duration>,
}

/// How a flow ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// Both directions reached end of stream.
    Finished,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The maximum lifetime passed.
    Lifetime,
    /// A policy reload revoked it.
    Revoked(Revocation),
    /// A read or write failed.
    Error(
        #[expect(
            dead_code,
            reason = "nothing acts on the cause; it is kept for the outcome's Debug output"
        )]
        io::Error,
    ),
}

/// The end of a flow and what it carried.
#[derive(Debug)]
pub(super) struct SpliceOutcome {
    /// Why it ended.
    pub ended: Ended,
    /// Bytes from the client side to the destination side.
    pub up: u64,
    /// Bytes from the destination side to the client side.
    pub down: u64,
    /// How long it was open.
    pub duration: Duration,
}

/// Copy `client` to `server` and back until both directions end, a limit passes or `revoked`
/// completes. End of stream on one side is passed on as a half-close to the other, and the
/// opposite direction keeps flowing.
pub(super) async fn splice<CS, CK, SS, SK>(
    client: (CS, CK),
    server: (SS, SK),
    limits: Limits,
    revoked: impl Future<Output = Revocation>,
) -> SpliceOutcome
where
    CS: Source,
    CK: Sink,
    SS: Source,
    SK: Sink,
{
    let start = Instant::now();
    let activity = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (mut client_source, mut client_sink) = client;
    let (mut server_source, mut server_sink) = server;
    let both = async {
        tokio::try_join!(
            pump(&mut client_source, &mut server_sink, &up, &activity, start),
            pump(
                &mut server_source,
                &mut client_sink,
                &down,
                &activity,
                start
            ),
        )
    };
    let ended = tokio::select! {
        result = both => match result {
            Ok(_) => Ended::Finished,
            Err(e) => Ended::Error(e),
        },
        () = idle(limits.idle, &activity, start) => Ended::IdleTimeout,
        () = sleep_for(limits.lifetime) => Ended::Lifetime,
        revocation = revoked => Ended::Revoked(revocation),
    };
    SpliceOutcome {
        ended,
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        duration: start.elapsed(),
    }
}

/// Copy `source` to `sink` while waiting for `until`, stopping once `budget` bytes went; returns
/// what `until` gave, and the bytes copied or the error that made a write fail (bytes may then
/// be lost, so the flow must not go on). End of stream is not passed on: the source reports it
/// again when read next. A read that fails only stops the copy; the next read reports it.
pub(super) async fn forward_until<T>(
    source: &mut impl Source,
    sink: &mut impl Sink,
    budget: u64,
    until: impl Future<Output = T>,
) -> (T, io::Result<u64>) {
    let mut until = std::pin::pin!(until);
    let mut copied = Ok(0);
    let mut reading = true;
    loop {
        let room = matches!(copied, Ok(n) if n < budget);
        tokio::select! {
            biased;
            out = &mut until => return (out, copied),
            chunk = source.next_chunk(), if reading && room => match chunk {
                Ok(Some(chunk)) => {
                    let len = chunk.len() as u64;
                    copied = match sink.write_chunk(chunk).await {
                        Ok(()) => copied.map(|n| n + len),
                        Err(error) => Err(error),
                    };
                }
                Ok(None) | Err(_) => reading = false,
            },
        }
    }
}

/// One direction: copy until end of stream, then half-close.
async fn pump(
    source: &mut impl Source,
    sink: &mut impl Sink,
    bytes: &AtomicU64,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    while let Some(chunk) = source.next_chunk().await? {
        let len = chunk.len() as u64;
        sink.write_chunk(chunk).await?;
        bytes.fetch_add(len, Ordering::Relaxed);
        activity.store(millis_since(start), Ordering::Relaxed);
    }
    sink.finish().await
}

/// Completes once nothing has moved for `idle` (never when `None`).
async fn idle(idle: Option<Duration>, activity: &AtomicU64, start: Instant) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    const NO_LIMITS: Limits = Limits {
        idle: None,
        lifetime: None,
    };

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, client_end) = pair().await;
        let (server_end, mut server) = pair().await;
        let flow = tokio::spawn(splice(
            tcp_ends(client_end),
            tcp_ends(server_end),
            NO_LIMITS,
            std::future::pending(),
        ));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"request",
            "the client's half-close reached the server"
        );
        server.write_all(b"a longer response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"a longer response");
        let outcome = flow.await.unwrap();
        assert!(matches!(outcome.ended, Ended::Finished), "{outcome:?}");
        assert_eq!((outcome.up, outcome.down), (7, 17));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_flows_time_out() {
        let (_client, client_end) = pair().await;
        let (server_end, _server) = pair().await;
        let limits = Limits {
            idle: Some(Duration::from_secs(30)),
            lifetime: None,
        };
        let outcome = splice(
            tcp_ends(client_end),
            tcp_ends(server_end),
            limits,
            std::future::pending(),
        )
        .await;
        assert!(matches!(outcome.ended, Ended::IdleTimeout), "{outcome:?}");
    }

    #[tokio::test]
    async fn revocation_ends_the_flow() {
        let (_client, client_end) = pair().await;
        let (server_end, _server) = pair().await;
        let revocation = Revocation {
            policy_version: 3,
            rule: Some(2),
        };
        let outcome = splice(
            tcp_ends(client_end),
            tcp_ends(server_end),
            NO_LIMITS,
            std::future::ready(revocation),
        )
        .await;
        assert!(
            matches!(outcome.ended, Ended::Revoked(r) if r == revocation),
            "{outcome:?}"
        );
    }
}
