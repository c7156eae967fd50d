//! A connection's writer task: takes everything queued in the outbox, encodes it into one
//! buffer and writes it, so a busy connection sends many frames per syscall.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use relay_proto::{Message, MessageCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;

/// How the writer stopped.
#[derive(Debug)]
pub(crate) enum WriteEnd {
    /// The outbox was closed and everything in it was written.
    Finished,
    /// The client accepted no bytes for the write timeout.
    SlowConsumer,
    /// The server's shutdown drain time ran out.
    Aborted,
    /// The socket failed (the client went away).
    Failed(io::Error),
}

/// Writes the outbox to `socket` until the outbox is closed and drained, then shuts down the
/// sending side. Whatever ends it, the outbox is closed on return so no one queues more.
///
/// Returns how it ended and every message that was not completely written (the rest of a
/// failed batch and whatever was still queued), so their senders can be told.
pub(crate) async fn run(
    mut socket: OwnedWriteHalf,
    outbox: Outbox,
    max_frame_len: usize,
    write_timeout: Duration,
    abort: CancellationToken,
) -> (WriteEnd, Vec<Message>) {
    let mut unwritten = Vec::new();
    let end =
        write_all(&mut socket, &outbox, max_frame_len, write_timeout, &abort, &mut unwritten).await;
    outbox.close(None);
    if matches!(end, WriteEnd::Finished) {
        // Send FIN so the client sees a clean end after the last frame. Bounded, because a
        // client that stopped reading can stall even this.
        let _ = tokio::time::timeout(write_timeout, socket.shutdown()).await;
    } else {
        outbox.drain_into(&mut unwritten);
    }
    (end, unwritten)
}

async fn write_all(
    socket: &mut OwnedWriteHalf,
    outbox: &Outbox,
    max_frame_len: usize,
    write_timeout: Duration,
    abort: &CancellationToken,
    unwritten: &mut Vec<Message>,
) -> WriteEnd {
    let mut codec = MessageCodec::new(max_frame_len);
    let mut batch = Vec::new();
    // Where each message of the batch ends in `buf`, to know which were fully written.
    let mut ends = Vec::new();
    let mut buf = BytesMut::new();
    loop {
        let taken = tokio::select! {
            taken = outbox.take(&mut batch) => taken,
            () = abort.cancelled() => return WriteEnd::Aborted,
        };
        let Some(bytes) = taken else {
            return WriteEnd::Finished;
        };
        for msg in &batch {
            // Every message was checked against the frame limit before it was queued, so
            // this cannot fail; if it somehow did, dropping one frame beats corrupting the
            // stream.
            if let Err(e) = codec.encode(msg, &mut buf) {
                tracing::error!(error = %e, "dropping a message that does not encode");
            }
            ends.push(buf.len());
        }
        let total = buf.len();
        // The deadline is per write: a client that drains slowly but steadily is fine; one
        // that accepts nothing for `write_timeout` is a slow consumer.
        while !buf.is_empty() {
            let failed = tokio::select! {
                written = tokio::time::timeout(write_timeout, socket.write_buf(&mut buf)) => {
                    match written {
                        Err(_) => Some(WriteEnd::SlowConsumer),
                        Ok(Ok(0)) => Some(WriteEnd::Failed(io::ErrorKind::WriteZero.into())),
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(WriteEnd::Failed(e)),
                    }
                }
                () = abort.cancelled() => Some(WriteEnd::Aborted),
            };
            if let Some(end) = failed {
                let written = total - buf.len();
                unwritten.extend(
                    batch.drain(..).zip(&ends).filter(|(_, end)| **end > written).map(|(m, _)| m),
                );
                return end;
            }
        }
        batch.clear();
        ends.clear();
        outbox.written(bytes);
        // Do not keep a large buffer around after a burst.
        if buf.capacity() > 64 * 1024 {
            buf = BytesMut::new();
        }
    }
}
