//! The request side of a Workload API connection as h2 accepts it.
//!
//! gRPC's C core (grpcio for Python, and the C# and Ruby stacks built on it) sends, on a Unix
//! socket, the percent-encoded socket path as `:authority` (`tmp%2Fx%2Fapi.sock`; grpc/grpc
//! #38142), and Java sends the raw path. h2 refuses either as a malformed authority and resets
//! the stream (hyperium/h2 #487, unmerged), so pyspiffe could never fetch an SVID from a
//! tonic server. SPIRE's Go server accepts them; so does this one: the client's bytes pass
//! through a reader that decodes every header block (HPACK, with the client's dynamic table),
//! puts `localhost` in place of an `:authority` that is not a valid authority (nothing here
//! reads the authority: a Unix socket has one peer), and encodes the block again for h2 (with
//! a dynamic table of its own, which h2's decoder mirrors). Every other frame passes
//! unchanged. What it refuses, by ending the connection: a frame larger than the server's
//! maximum, a header block larger than [`MAX_HEADER_BYTES`] or decoding to more than [`MAX_HEADER_BYTES`],
//! undecodable HPACK, and a header block interrupted by another frame: h2 would refuse each of
//! them as well.
#![forbid(unsafe_code)]

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, BufMut as _, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload the server accepts (its `SETTINGS_MAX_FRAME_SIZE`, the default).
const MAX_FRAME: usize = 16_384;
/// The largest header block, encoded or decoded (name, value and 32 octets per field): the
/// header list size the server accepts.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The dynamic table size the server's decoder allows (`SETTINGS_HEADER_TABLE_SIZE` default).
const TABLE_SIZE: usize = 4096;
/// What a malformed authority becomes.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Reads a client's HTTP/2 bytes from `inner` with every request's `:authority` made valid.
#[derive(Debug)]
pub(crate) struct AuthorityFix<R> {
    inner: R,
    /// Bytes read, not yet made into frames.
    input: BytesMut,
    /// Frames ready for the server.
    output: BytesMut,
    /// Preface bytes still to pass through.
    preface: usize,
    /// A header block waiting for its CONTINUATION frames: stream, `END_STREAM`, fragments.
    pending: Option<(u32, bool, Vec<u8>)>,
    codec: Codec,
    /// The peer ended its side.
    eof: bool,
}

/// The HPACK state of one connection.
struct Codec {
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Codec")
    }
}

impl<R> AuthorityFix<R> {
    /// Reads from `inner`, which starts with the client connection preface.
    pub(crate) fn new(inner: R) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            preface: PREFACE.len(),
            pending: None,
            codec: Codec {
                decoder,
                encoder: Encoder::new(),
            },
            eof: false,
        }
    }

    /// The inner stream (for writes).
    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The inner stream.
    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Takes `bytes` the client sent and makes frames of them.
    fn feed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.input.put_slice(bytes);
        self.process()
    }

    /// Moves every complete frame of `input` to `output`, header blocks rewritten.
    fn process(&mut self) -> io::Result<()> {
        if self.preface > 0 {
            let take = self.preface.min(self.input.len());
            let offset = PREFACE.len() - self.preface;
            if self.input[..take] != PREFACE[offset..offset + take] {
                return Err(invalid("not an HTTP/2 client preface"));
            }
            self.output.put(self.input.split_to(take));
            self.preface -= take;
        }
        while self.preface == 0 && self.input.len() >= 9 {
            let length = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            if length > MAX_FRAME {
                return Err(invalid("a frame larger than the server's maximum"));
            }
            if self.input.len() < 9 + length {
                break;
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream =
                u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]])
                    & 0x7fff_ffff;
            let frame = self.input.split_to(9 + length);
            self.frame(kind, flags, stream, &frame)?;
        }
        Ok(())
    }

    /// One whole frame (`frame` includes its 9-byte header).
    fn frame(&mut self, kind: u8, flags: u8, stream: u32, frame: &[u8]) -> io::Result<()> {
        let payload = &frame[9..];
        match (kind, self.pending.take()) {
            (HEADERS, None) => {
                let fragment = headers_fragment(flags, payload)?;
                self.fragment(stream, flags & END_STREAM != 0, fragment.to_vec(), flags)
            }
            (CONTINUATION, Some((pending, end_stream, mut block))) if pending == stream => {
                block.extend_from_slice(payload);
                self.fragment(stream, end_stream, block, flags)
            }
            (_, Some(_)) | (CONTINUATION, None) => {
                Err(invalid("a header block interrupted by another frame"))
            }
            (_, None) => {
                self.output.put_slice(frame);
                Ok(())
            }
        }
    }

    /// A header block so far; rewritten and queued once it ends.
    fn fragment(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: Vec<u8>,
        flags: u8,
    ) -> io::Result<()> {
        if block.len() > MAX_HEADER_BYTES {
            return Err(invalid("a header block larger than the limit"));
        }
        if flags & END_HEADERS == 0 {
            self.pending = Some((stream, end_stream, block));
            return Ok(());
        }
        let encoded = self.codec.rewrite(&block)?;
        write_headers(&mut self.output, stream, end_stream, &encoded);
        Ok(())
    }
}

impl Codec {
    /// `block` decoded, its `:authority` made valid, encoded again.
    fn rewrite(&mut self, block: &[u8]) -> io::Result<Vec<u8>> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0_usize;
        self.decoder
            .decode_with_cb(block, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_BYTES {
                    let value = if *name == *b":authority" && !valid_authority(&value) {
                        LOCALHOST.to_vec()
                    } else {
                        value.into_owned()
                    };
                    fields.push((name.into_owned(), value));
                }
            })
            .map_err(|error| invalid(&format!("undecodable header block: {error}")))?;
        if size > MAX_HEADER_BYTES {
            return Err(invalid("a header list larger than the limit"));
        }
        Ok(self.encoder.encode(
            fields
                .iter()
                .map(|(name, value)| (name.as_slice(), value.as_slice())),
        ))
    }
}

/// Whether h2 accepts `value` as an authority.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The header block fragment of a HEADERS frame's payload (padding and priority removed).
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut fragment = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&length, rest) = fragment
            .split_first()
            .ok_or_else(|| invalid("a padded HEADERS frame without its pad length"))?;
        padding = usize::from(length);
        fragment = rest;
    }
    if flags & PRIORITY != 0 {
        fragment = fragment
            .get(5..)
            .ok_or_else(|| invalid("a HEADERS frame too short for its priority"))?;
    }
    fragment
        .len()
        .checked_sub(padding)
        .map(|end| &fragment[..end])
        .ok_or_else(|| invalid("a HEADERS frame's padding exceeds it"))
}

/// `block` as a HEADERS frame on `stream` and as many CONTINUATION frames as it needs.
fn write_headers(output: &mut BytesMut, stream: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = HEADERS;
    let mut first_flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        write_frame(output, HEADERS, first_flags | END_HEADERS, stream, &[]);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = first_flags | if last { END_HEADERS } else { 0 };
        write_frame(output, kind, flags, stream, chunk);
        kind = CONTINUATION;
        first_flags = 0;
    }
}

fn write_frame(output: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    output.put_slice(&length.to_be_bytes()[1..]);
    output.put_u8(kind);
    output.put_u8(flags);
    output.put_u32(stream);
    output.put_slice(payload);
}

/// What a strict HTTP/2 server reads of `input` (a client's bytes, preface first) once the
/// Workload API has rewritten its header blocks, or why the connection ends there (for the
/// fuzz target).
#[cfg(feature = "testing")]
pub fn rewrite_requests(input: &[u8]) -> io::Result<Vec<u8>> {
    let mut fix = AuthorityFix::new(());
    fix.feed(input)?;
    Ok(fix.output.to_vec())
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Workload API connection: {what}"),
    )
}

impl<R: AsyncRead + Unpin> AsyncRead for AuthorityFix<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let take = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..take]);
                this.output.advance(take);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0_u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => this.feed(read.filled())?,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// A client's preface, SETTINGS, and a request whose header block `fields` encodes.
    fn request(fields: &[(&[u8], &[u8])], encoder: &mut Encoder<'_>) -> Vec<u8> {
        let mut bytes = BytesMut::from(PREFACE);
        write_frame(&mut bytes, 0x4, 0, 0, &[]);
        let block = encoder.encode(fields.iter().copied());
        write_headers(&mut bytes, 1, false, &block);
        write_frame(&mut bytes, 0x0, END_STREAM, 1, b"\0\0\0\0\0");
        bytes.to_vec()
    }

    async fn through(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut fixed = AuthorityFix::new(std::io::Cursor::new(bytes));
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await?;
        Ok(out)
    }

    /// The header fields of the first HEADERS block after the preface and SETTINGS.
    fn fields(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let frames = &bytes[PREFACE.len() + 9..];
        let length = usize::from(frames[2]) | usize::from(frames[1]) << 8;
        assert_eq!(frames[3], HEADERS);
        Decoder::new()
            .decode(&frames[9..9 + length])
            .expect("decodes")
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_passes() {
        let grpc = request(
            &[
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b":authority", b"tmp%2Fenf%2Fapi.sock"),
                (b"workload.spiffe.io", b"true"),
            ],
            &mut Encoder::new(),
        );
        let out = through(grpc).await.expect("passes");
        let fields = fields(&out);
        assert!(fields.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        assert!(fields.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
        assert!(
            out.ends_with(b"\0\0\0\0\0"),
            "the DATA frame passes unchanged"
        );
        let raw = request(
            &[(b":authority", b"/run/enforcer/public/api.sock")],
            &mut Encoder::new(),
        );
        let fields = super::tests::fields(&through(raw).await.expect("passes"));
        assert_eq!(
            fields,
            vec![(b":authority".to_vec(), b"localhost".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let request = request(&[(b":authority", b"localhost:8080")], &mut Encoder::new());
        let out = through(request).await.expect("passes");
        assert_eq!(
            fields(&out),
            vec![(b":authority".to_vec(), b"localhost:8080".to_vec())]
        );
    }

    #[tokio::test]
    async fn bad_input_ends_the_connection() {
        let not_http2 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(through(not_http2).await.is_err(), "not a preface");
        let mut oversized = PREFACE.to_vec();
        oversized.extend_from_slice(&[0x01, 0x00, 0x00, 0x0, 0, 0, 0, 0, 1]);
        assert!(through(oversized).await.is_err(), "a 64 KiB frame");
        let mut garbage = PREFACE.to_vec();
        write_frame_vec(&mut garbage, HEADERS, END_HEADERS, 1, &[0xff; 16]);
        assert!(through(garbage).await.is_err(), "undecodable HPACK");
        let mut interrupted = PREFACE.to_vec();
        let block = Encoder::new().encode([(&b":path"[..], &b"/"[..])]);
        write_frame_vec(&mut interrupted, HEADERS, 0, 1, &block);
        write_frame_vec(&mut interrupted, 0x0, 0, 1, b"x");
        assert!(through(interrupted).await.is_err(), "interrupted block");
    }

    fn write_frame_vec(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut bytes = BytesMut::new();
        write_frame(&mut bytes, kind, flags, stream, payload);
        out.extend_from_slice(&bytes);
    }

    #[test]
    fn a_long_block_is_split_into_continuation_frames() {
        let mut out = BytesMut::new();
        write_headers(&mut out, 3, true, &vec![7; MAX_FRAME + 10]);
        assert_eq!(&out[3..5], &[HEADERS, END_STREAM]);
        let second = &out[9 + MAX_FRAME..];
        assert_eq!(&second[..3], &[0, 0, 10]);
        assert_eq!(&second[3..5], &[CONTINUATION, END_HEADERS]);
    }

    #[test]
    fn padding_and_priority_are_removed_from_a_fragment() {
        let payload = [2, 1, 2, 3, 4, 5, 0xaa, 0xbb, 0, 0];
        assert_eq!(
            headers_fragment(PADDED | PRIORITY, &payload).expect("fragment"),
            &[0xaa, 0xbb]
        );
        assert!(headers_fragment(PADDED, &[9, 1]).is_err());
    }
}
