//! Streamed reply bodies: a line stream that forwards what a handler sends through an mpsc
//! channel as it arrives (`--follow`), until the handler drops its sender or the client goes
//! away (hyper drops the body, and with it the receiver); and a wrapper the server puts around
//! every streamed body so that it also ends when the server shuts down.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use tokio::sync::mpsc;

/// A future that completes when the server shuts down.
pub(crate) type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A streamed body of lines: each item received is one data frame, sent as soon as it arrives,
/// with a `\n` appended when it does not end with one. Empty items are skipped, since an empty
/// chunk would end a chunked body.
pub(crate) struct LineStream {
    /// The lines, until the stream has ended.
    lines: Option<mpsc::Receiver<Bytes>>,
}

impl LineStream {
    /// A stream of what arrives on `lines`.
    pub(crate) fn new(lines: mpsc::Receiver<Bytes>) -> Self {
        Self { lines: Some(lines) }
    }
}

impl fmt::Debug for LineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineStream")
            .field("open", &self.lines.is_some())
            .finish()
    }
}

impl Body for LineStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(lines) = &mut this.lines else {
            return Poll::Ready(None);
        };
        loop {
            match lines.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.lines = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(line)) if line.is_empty() => {}
                Poll::Ready(Some(line)) => {
                    return Poll::Ready(Some(Ok(Frame::data(terminated(line)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lines.is_none()
    }
}

fn terminated(line: Bytes) -> Bytes {
    if line.ends_with(b"\n") {
        return line;
    }
    let mut terminated = BytesMut::with_capacity(line.len() + 1);
    terminated.extend_from_slice(&line);
    terminated.extend_from_slice(b"\n");
    terminated.freeze()
}

/// A body that ends early, dropping the rest of `B` (and so closing a [`LineStream`]'s
/// channel), once the server shuts down.
pub(crate) struct UntilShutdown<B> {
    /// The body and the shutdown signal, until the body has ended.
    open: Option<(B, Shutdown)>,
}

impl<B> UntilShutdown<B> {
    /// `body`, cut short when `shutdown` completes.
    pub(crate) fn new(body: B, shutdown: Shutdown) -> Self {
        Self {
            open: Some((body, shutdown)),
        }
    }
}

impl<B: Body + Unpin> Body for UntilShutdown<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some((body, shutdown)) = &mut this.open else {
            return Poll::Ready(None);
        };
        if shutdown.as_mut().poll(cx).is_ready() {
            this.open = None;
            return Poll::Ready(None);
        }
        let frame = Pin::new(body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            this.open = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.open
            .as_ref()
            .is_none_or(|(body, _)| body.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        task::Wake,
    };

    use super::*;

    /// Records whether the body asked to be woken.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn poll<B>(body: &mut B, flag: &Arc<Flag>) -> Poll<Option<Bytes>>
    where
        B: Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let waker = Arc::clone(flag).into();
        let mut cx = Context::from_waker(&waker);
        Pin::new(body).poll_frame(&mut cx).map(|frame| {
            frame.map(|frame| {
                let Ok(frame) = frame;
                frame
                    .into_data()
                    .expect("a line stream sends only data frames")
            })
        })
    }

    fn never() -> Shutdown {
        Box::pin(future::pending())
    }

    #[test]
    fn forwards_lines_as_they_arrive_and_ends_when_the_sender_is_dropped() {
        let (sender, receiver) = mpsc::channel(4);
        let mut body = UntilShutdown::new(LineStream::new(receiver), never());
        let flag = Arc::new(Flag::default());
        assert_eq!(poll(&mut body, &flag), Poll::Pending);
        assert!(!body.is_end_stream());

        sender.try_send(Bytes::from_static(b"{\"n\":1}\n")).unwrap();
        assert!(flag.0.load(Ordering::SeqCst), "a new line wakes the body");
        assert_eq!(
            poll(&mut body, &flag),
            Poll::Ready(Some(Bytes::from_static(b"{\"n\":1}\n")))
        );

        sender.try_send(Bytes::from_static(b"{\"n\":2}")).unwrap();
        drop(sender);
        assert_eq!(
            poll(&mut body, &flag),
            Poll::Ready(Some(Bytes::from_static(b"{\"n\":2}\n"))),
            "a newline is appended when missing"
        );
        assert_eq!(poll(&mut body, &flag), Poll::Ready(None));
        assert!(body.is_end_stream());
        assert_eq!(poll(&mut body, &flag), Poll::Ready(None), "stays ended");
    }

    #[test]
    fn skips_empty_items() {
        let (sender, receiver) = mpsc::channel(4);
        let mut body = LineStream::new(receiver);
        sender.try_send(Bytes::new()).unwrap();
        sender.try_send(Bytes::from_static(b"x")).unwrap();
        let flag = Arc::new(Flag::default());
        assert_eq!(
            poll(&mut body, &flag),
            Poll::Ready(Some(Bytes::from_static(b"x\n")))
        );
        assert_eq!(poll(&mut body, &flag), Poll::Pending);
    }

    #[test]
    fn ends_at_shutdown_even_with_the_sender_alive() {
        let (sender, receiver) = mpsc::channel(4);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let mut body = UntilShutdown::new(LineStream::new(receiver), shutdown);
        let flag = Arc::new(Flag::default());
        assert_eq!(poll(&mut body, &flag), Poll::Pending);

        stop.send(()).unwrap();
        assert!(flag.0.load(Ordering::SeqCst), "shutdown wakes the body");
        sender.try_send(Bytes::from_static(b"late")).unwrap();
        assert_eq!(poll(&mut body, &flag), Poll::Ready(None));
        assert!(body.is_end_stream());
        assert_eq!(poll(&mut body, &flag), Poll::Ready(None), "stays ended");
        assert!(
            sender.is_closed(),
            "the handler learns the stream is gone when it sends next"
        );
    }
}
