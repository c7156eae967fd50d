//! Reading frames from a TCP connection, built for both ends of the load range: a busy
//! connection reads many frames per syscall, and the caller can take every complete frame in
//! the buffer ([`FrameReader::buffered`]) before it goes back to waiting; a connection gone
//! idle can give its read buffer back ([`FrameReader::release_if_empty`]).

use std::io;

use bytes::BytesMut;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::Decoder;

use crate::codec::MessageCodec;
use crate::error::ProtoError;
use crate::limits::FRAME_HEADER_LEN;
use crate::message::Message;

/// Most bytes read per syscall.
const READ_CHUNK: usize = 16 * 1024;

/// The read half of a connection and the frames buffered from it.
#[derive(Debug)]
pub struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    codec: MessageCodec,
}

impl FrameReader {
    /// Reads frames from `read`, decoding them with `codec` (whose limit applies).
    pub fn new(read: OwnedReadHalf, codec: MessageCodec) -> FrameReader {
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
        loop {
            self.read.readable().await?;
            // Read at most a frame's worth (and at most `READ_CHUNK`): before registration
            // the limit is small, so a socket that sends a few bytes and stalls holds little.
            let chunk = READ_CHUNK.min(self.codec.max_frame_len() + FRAME_HEADER_LEN);
            let fresh = self.buf.capacity() == 0;
            if self.buf.capacity() - self.buf.len() < chunk / 2 {
                self.buf.reserve(chunk);
            }
            match self.read.try_read_buf(&mut self.buf) {
                Ok(0) if self.buf.is_empty() => return Ok(false),
                Ok(0) => return Err(ProtoError::Truncated { buffered: self.buf.len() }),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness is cached, so an idle connection often gets here once before
                    // it really waits: do not wait holding a buffer allocated for nothing.
                    if fresh {
                        self.buf = BytesMut::new();
                    }
                }
                Err(e) => return Err(e.into()),
            }
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
