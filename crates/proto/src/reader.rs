//! Reading frames from a TCP connection, built for both ends of the load range: a busy
//! connection reads many frames per syscall, and the caller can take every complete frame in
//! the buffer ([`FrameReader::buffered`]) before it goes back to waiting; a connection gone
//! idle can give its read buffer back ([`FrameReader::release_if_empty`]). It reads from a
//! [`Source`]: a TCP read half, which waits for bytes without holding a buffer, or any other
//! byte stream ([`Stream`]: TLS).

use std::io;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::Decoder;

use crate::codec::MessageCodec;
use crate::error::ProtoError;
use crate::limits::FRAME_HEADER_LEN;
use crate::message::Message;

/// Most bytes read per syscall.
const READ_CHUNK: usize = 16 * 1024;

/// Makes room for about `chunk` more bytes in `buf`, unless half that is free already.
fn make_room(buf: &mut BytesMut, chunk: usize) {
    if buf.capacity() - buf.len() < chunk / 2 {
        buf.reserve(chunk);
    }
}

/// Where a [`FrameReader`] reads bytes from: the transport seam's read side. Poll-based, so
/// a connection waiting for bytes keeps no future of it, only the frame reader's own state.
pub trait Source: Send + Sync + Unpin + 'static {
    /// Appends what is there to `buf` (making room for about `chunk` bytes), or registers
    /// for a wake-up; `Ok(0)` at the end of the stream.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>>;
}

impl Source for OwnedReadHalf {
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.as_ref().poll_read_ready(cx))?;
            let fresh = buf.capacity() == 0;
            make_room(buf, chunk);
            match self.try_read_buf(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness is cached, so an idle connection often gets here once before
                    // it really waits: do not wait holding a buffer allocated for nothing.
                    if fresh {
                        *buf = BytesMut::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Any other byte stream as a [`Source`] (a TLS session's read half, say). Such a stream has
/// no readiness of its own to wait on (its bytes may already be decrypted inside it), so a
/// read waits with room in the buffer: a little while the connection is quiet, a chunk once
/// a read has filled that.
#[derive(Debug)]
pub struct Stream<R> {
    inner: R,
    /// The last read filled the room it had: more is coming.
    busy: bool,
}

/// The room a quiet stream waits with.
const QUIET_READ: usize = 512;

impl<R> Stream<R> {
    /// Reads from `inner`.
    pub fn new(inner: R) -> Stream<R> {
        Stream { inner, busy: false }
    }
}

impl<R: AsyncRead + Send + Sync + Unpin + 'static> Source for Stream<R> {
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        let room = if self.busy { chunk } else { QUIET_READ.min(chunk) };
        make_room(buf, room);
        let spare = buf.capacity() - buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            std::pin::Pin::new(&mut self.inner),
            cx,
            buf
        ))?;
        self.busy = n >= spare.min(chunk) / 2 && n > 0;
        Poll::Ready(Ok(n))
    }
}

/// The read half of a connection and the frames buffered from it.
#[derive(Debug)]
pub struct FrameReader<S = OwnedReadHalf> {
    read: S,
    buf: BytesMut,
    codec: MessageCodec,
}

impl<S: Source> FrameReader<S> {
    /// Reads frames from `read`, decoding them with `codec` (whose limit applies).
    pub fn new(read: S, codec: MessageCodec) -> FrameReader<S> {
        FrameReader { read, buf: BytesMut::new(), codec }
    }

    /// Changes the frame limit for frames not yet started.
    pub fn set_max_frame_len(&mut self, max: usize) {
        self.codec.set_max_frame_len(max);
    }

    /// Frees the read buffer if it holds nothing, so an idle connection costs no buffer
    /// memory. Call it when the connection goes quiet, not after every read: reallocating a
    /// buffer per read is a large malloc each time, which is slow (glibc consolidates its
    /// free lists on every large request).
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete frame already in the buffer, if any, decoded. Never waits.
    ///
    /// # Errors
    /// A frame over the limit or a body that does not decode.
    pub fn buffered(&mut self) -> Result<Option<Message>, ProtoError> {
        self.codec.decode(&mut self.buf)
    }

    /// The body of the next complete frame already in the buffer, if any, not yet decoded:
    /// decode it in place with [`decode_ref`](crate::decode_ref). Never waits.
    ///
    /// # Errors
    /// A frame over the limit.
    pub fn buffered_frame(&mut self) -> Result<Option<BytesMut>, ProtoError> {
        self.codec.decode_frame(&mut self.buf)
    }

    /// Whether part of a frame is buffered (after [`FrameReader::buffered_frame`] said no whole
    /// one is): a frame has started and not finished.
    pub fn has_partial_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Waits for bytes and reads what is there. Returns `Ok(false)` at a clean end of stream.
    /// Cancel-safe: bytes read are kept.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] if the stream ends inside a frame; [`ProtoError::Io`] if the
    /// read fails.
    pub async fn fill(&mut self) -> Result<bool, ProtoError> {
        // Read at most a frame's worth (and at most `READ_CHUNK`): before registration the
        // limit is small, so a socket that sends a few bytes and stalls holds little.
        let chunk = READ_CHUNK.min(self.codec.max_frame_len() + FRAME_HEADER_LEN);
        let (read, buf) = (&mut self.read, &mut self.buf);
        match std::future::poll_fn(|cx| read.poll_read_some(cx, buf, chunk)).await {
            Ok(0) if self.buf.is_empty() => Ok(false),
            Ok(0) => Err(ProtoError::Truncated { buffered: self.buf.len() }),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// The next frame, reading as needed; `None` at a clean end of stream. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Message, ProtoError>> {
        loop {
            match self.buffered() {
                Ok(Some(msg)) => return Some(Ok(msg)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
