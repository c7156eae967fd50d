//! Reading frames from a TCP connection, built for both ends of the load range: a busy
//! connection reads many frames per syscall, and the caller can take every complete frame in
//! the buffer ([`FrameReader::buffered`]) before it goes back to waiting; a connection gone
//! idle can give its read buffer back ([`FrameReader::release_if_empty`]). It reads from a
//! [`Source`]: a TCP read half, which waits for bytes without holding a buffer, or any other
//! byte stream ([`Stream`]: TLS).

use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncRead;
use tokio::net::tcp::OwnedReadHalf;

use crate::codec::MessageCodec;
use crate::encoding::decode_body;
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

/// The bodies of the whole frames at the front of `frames` (length headers and bodies back to
/// back, as [`FrameReader::take_run`] returns them), each with its offset in `frames`. Stops
/// at anything that is not a whole frame.
pub fn frames_in(frames: &[u8]) -> impl Iterator<Item = (usize, &[u8])> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = frames.get(at..)?.first_chunk::<FRAME_HEADER_LEN>()?;
        let len = usize::try_from(u32::from_be_bytes(*header)).ok()?;
        let start = at + FRAME_HEADER_LEN;
        let body = frames.get(start..start.checked_add(len)?)?;
        at = start + len;
        Some((start, body))
    })
}

/// What [`FrameReader::take_run`] does, on any buffer of frames read (with `codec`'s limit).
pub fn split_run(
    codec: &MessageCodec,
    buf: &mut BytesMut,
    mut accept: impl FnMut(&[u8]) -> bool,
) -> Option<BytesMut> {
    let mut end = 0;
    while let Some(rest) = buf.get(end..)
        && let Ok(Some(len)) = codec.complete_frame(rest)
        && let Some(body) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)
        && accept(body)
    {
        end += FRAME_HEADER_LEN + len;
    }
    (end > 0).then(|| buf.split_to(end))
}

/// The read half of a connection and the frames buffered from it.
#[derive(Debug)]
pub struct FrameReader<S = OwnedReadHalf> {
    read: S,
    buf: BytesMut,
    codec: MessageCodec,
    /// Bytes at the front of `buf` that belong to the frame last lent out by
    /// [`FrameReader::buffered_body`]: dropped on the next call to the reader.
    consumed: usize,
}

impl<S: Source> FrameReader<S> {
    /// Reads frames from `read`, decoding them with `codec` (whose limit applies).
    pub fn new(read: S, codec: MessageCodec) -> FrameReader<S> {
        FrameReader { read, buf: BytesMut::new(), codec, consumed: 0 }
    }

    /// Drops the frame last lent out, if any.
    fn settle(&mut self) {
        if self.consumed > 0 {
            self.buf.advance(std::mem::take(&mut self.consumed));
        }
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
        self.settle();
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete frame already in the buffer, if any, decoded. Never waits.
    ///
    /// # Errors
    /// A frame over the limit or a body that does not decode.
    pub fn buffered(&mut self) -> Result<Option<Message>, ProtoError> {
        match self.buffered_body()? {
            Some(body) => decode_body(body).map(Some),
            None => Ok(None),
        }
    }

    /// The body of the next complete frame already in the buffer, if any, lent in place (not
    /// split off: no reference count to take and drop per frame): decode it with
    /// [`decode_ref`](crate::decode_ref). It stays in the buffer until the next call to this
    /// reader. Never waits.
    ///
    /// # Errors
    /// A frame over the limit.
    pub fn buffered_body(&mut self) -> Result<Option<&[u8]>, ProtoError> {
        self.settle();
        let Some(len) = self.codec.complete_frame(&self.buf)? else { return Ok(None) };
        let end = FRAME_HEADER_LEN + len;
        self.consumed = end;
        Ok(self.buf.get(FRAME_HEADER_LEN..end))
    }

    /// The body of the next complete frame already in the buffer, like
    /// [`FrameReader::buffered_body`], but not taken: the next call to this reader returns it
    /// again, unless [`FrameReader::take_peeked`] takes it first. `None` also for a frame over
    /// the limit (the next call to [`FrameReader::buffered_body`] reports it). Never waits.
    pub fn peek_body(&mut self) -> Option<&[u8]> {
        self.settle();
        let len = self.codec.complete_frame(&self.buf).ok()??;
        self.buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)
    }

    /// Takes the frame [`FrameReader::peek_body`] returned: it is dropped from the buffer on
    /// the next call, as a frame from [`FrameReader::buffered_body`] is.
    pub fn take_peeked(&mut self) {
        if let Ok(Some(len)) = self.codec.complete_frame(&self.buf) {
            self.consumed = FRAME_HEADER_LEN + len;
        }
    }

    /// The body of the next complete frame already in the buffer, if any, split off (owned,
    /// for a caller that keeps part of it) and not yet decoded: decode it in place with
    /// [`decode_ref`](crate::decode_ref). Never waits.
    ///
    /// # Errors
    /// A frame over the limit.
    pub fn buffered_frame(&mut self) -> Result<Option<BytesMut>, ProtoError> {
        self.settle();
        let Some(len) = self.codec.complete_frame(&self.buf)? else { return Ok(None) };
        self.buf.advance(FRAME_HEADER_LEN);
        Ok(Some(self.buf.split_to(len)))
    }

    /// Splits off the front of the buffer, as one buffer, the run of complete frames whose
    /// bodies `accept` takes, in order, stopping at the first it does not (or at a frame not
    /// yet complete, or over the limit: the next call to [`FrameReader::buffered_frame`] sees
    /// that one). The frames keep their length headers: walk them with [`frames_in`]. `None`
    /// if the first frame is not taken. Never waits.
    ///
    /// A client uses it to hand the program every chat message of a socket read with one
    /// split and one reference count, rather than one per message.
    pub fn take_run(&mut self, accept: impl FnMut(&[u8]) -> bool) -> Option<BytesMut> {
        self.settle();
        split_run(&self.codec, &mut self.buf, accept)
    }

    /// Whether part of a frame is buffered (after [`FrameReader::buffered_body`] said no whole
    /// one is): a frame has started and not finished.
    pub fn has_partial_frame(&self) -> bool {
        self.buf.len() > self.consumed
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
        self.settle();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::decode_ref;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    /// The frames of `msgs`, back to back, as a peer sends them.
    fn wire(msgs: &[Message]) -> Vec<u8> {
        let mut codec = MessageCodec::new(crate::DEFAULT_MAX_FRAME_LEN);
        let mut out = BytesMut::new();
        for msg in msgs {
            codec.encode(msg, &mut out).unwrap();
        }
        out.to_vec()
    }

    /// Frames cut anywhere, even inside a header, come out whole and in order, each lent in
    /// place until the next call; a frame cut short shows as partial meanwhile.
    #[tokio::test]
    async fn bodies_are_lent_whole_however_the_bytes_arrive() {
        let msgs: Vec<Message> =
            (1..=40).map(|i| Message::send(i, "bob", "x".repeat(i as usize * 7))).collect();
        let bytes = wire(&msgs);
        for cut in [1, 3, 5, 64, 1000] {
            let (mut tx, rx) = tokio::io::duplex(64 * 1024);
            let mut reader =
                FrameReader::new(Stream::new(rx), MessageCodec::new(crate::DEFAULT_MAX_FRAME_LEN));
            let sending = bytes.clone();
            let writer = tokio::spawn(async move {
                for piece in sending.chunks(cut) {
                    tx.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            let mut got = Vec::new();
            while got.len() < msgs.len() {
                match reader.buffered_body().unwrap() {
                    Some(body) => got.push(decode_ref(body).unwrap().id),
                    None => assert!(reader.fill().await.unwrap(), "ended early (cut {cut})"),
                }
            }
            assert!(!reader.has_partial_frame());
            writer.await.unwrap();
            assert!(!reader.fill().await.unwrap(), "a clean end after the last frame");
            assert_eq!(got, (1..=40).collect::<Vec<u64>>(), "cut {cut}");
        }
    }

    /// An owned frame and a lent body can be taken from one reader in turn; a header over the
    /// limit is refused as soon as it is there, before its body.
    #[tokio::test]
    async fn owned_and_lent_frames_mix_and_an_oversized_header_is_refused_at_once() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::new(Stream::new(rx), MessageCodec::new(1024));
        let mut bytes = wire(&[Message::send(1, "bob", "a"), Message::send(2, "bob", "b")]);
        bytes.extend_from_slice(&5000u32.to_be_bytes());
        tx.write_all(&bytes).await.unwrap();
        assert!(reader.fill().await.unwrap());
        let lent = reader.buffered_body().unwrap().map(|b| decode_ref(b).unwrap().id);
        assert_eq!(lent, Some(1));
        let owned = reader.buffered_frame().unwrap().unwrap();
        assert_eq!(decode_ref(&owned).unwrap().id, 2);
        match reader.buffered_body() {
            Err(ProtoError::FrameTooLarge { len: 5000, max: 1024 }) => {}
            other => panic!("expected the header to be refused, got {other:?}"),
        }
    }

    /// A run takes whole frames, in order, up to the first its test refuses, and leaves that
    /// one (and anything partial, or over the limit) for the next call; its frames walk back
    /// out with their offsets.
    #[tokio::test]
    async fn a_run_takes_the_accepted_frames_in_one_piece_and_stops_at_the_first_refused() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::new(Stream::new(rx), MessageCodec::new(1024));
        let msgs: Vec<Message> =
            (1..=5).map(|i| Message::send(i, "bob", "x".repeat(i as usize))).collect();
        let mut bytes = wire(&msgs);
        bytes.extend_from_slice(&wire(&[Message::send(6, "bob", "y")])[..7]);
        tx.write_all(&bytes).await.unwrap();
        assert!(reader.fill().await.unwrap());
        assert!(reader.take_run(|_| false).is_none(), "nothing taken if the first is refused");
        let run = reader.take_run(|body| decode_ref(body).unwrap().id != 4).unwrap();
        let ids: Vec<u64> = frames_in(&run).map(|(_, body)| decode_ref(body).unwrap().id).collect();
        assert_eq!(ids, [1, 2, 3]);
        let (at, body) = frames_in(&run).nth(1).unwrap();
        assert_eq!(&run[at..at + body.len()], body);
        assert_eq!(decode_ref(reader.buffered_body().unwrap().unwrap()).unwrap().id, 4);
        let run = reader.take_run(|_| true).unwrap();
        assert_eq!(frames_in(&run).count(), 1, "the partial frame stays behind");
        assert!(reader.take_run(|_| true).is_none() && reader.has_partial_frame());
        // A header over the limit is never part of a run; the next read reports it.
        let mut reader =
            FrameReader::new(Stream::new(tokio::io::duplex(1).1), MessageCodec::new(1024));
        reader.buf.extend_from_slice(&wire(&[Message::send(1, "bob", "a")]));
        reader.buf.extend_from_slice(&5000u32.to_be_bytes());
        assert_eq!(reader.take_run(|_| true).map(|run| frames_in(&run).count()), Some(1));
        assert!(matches!(reader.buffered_body(), Err(ProtoError::FrameTooLarge { .. })));
        // A cut-short run ends the walk: nothing is read past the bytes there are.
        assert_eq!(frames_in(&bytes[..bytes.len() - 3]).count(), 5);
    }
}
