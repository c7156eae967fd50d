//! A connection's writer task: takes everything queued in the outbox (frames already encoded
//! back to back) and writes it, so a busy connection sends many frames per syscall.

use std::io;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::outbox::{Outbox, Unwritten};

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
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut socket: W,
    outbox: Outbox,
    write_timeout: Duration,
    abort: CancellationToken,
    bytes_out: Counter,
) -> (WriteEnd, Vec<Unwritten>) {
    let mut unwritten = Vec::new();
    let end =
        write_all(&mut socket, &outbox, write_timeout, &abort, &mut unwritten, &bytes_out).await;
    outbox.close(None);
    if matches!(end, WriteEnd::Finished) {
        // Send FIN so the client sees a clean end after the last frame. Bounded, because a
        // client that stopped reading can stall even this.
        let _ = tokio::time::timeout(write_timeout, socket.shutdown()).await;
    }
    // Nothing is queued after a clean finish; after a failure, the rest was never written.
    outbox.drain(&mut unwritten);
    (end, unwritten)
}

async fn write_all<W: AsyncWrite + Unpin>(
    socket: &mut W,
    outbox: &Outbox,
    write_timeout: Duration,
    abort: &CancellationToken,
    unwritten: &mut Vec<Unwritten>,
    bytes_out: &Counter,
) -> WriteEnd {
    loop {
        let taken = tokio::select! {
            taken = outbox.take() => taken,
            () = abort.cancelled() => return WriteEnd::Aborted,
        };
        let Some(batch) = taken else {
            return WriteEnd::Finished;
        };
        let mut written = 0;
        // The deadline is per write: a client that drains slowly but steadily is fine; one
        // that accepts nothing for `write_timeout` is a slow consumer.
        while written < batch.len() {
            let failed = tokio::select! {
                wrote = tokio::time::timeout(write_timeout, socket.write(&batch[written..])) => {
                    match wrote {
                        Err(_) => Some(WriteEnd::SlowConsumer),
                        Ok(Ok(0)) => Some(WriteEnd::Failed(io::ErrorKind::WriteZero.into())),
                        Ok(Ok(n)) => {
                            written += n;
                            bytes_out.inc_by(n as u64);
                            None
                        }
                        Ok(Err(e)) => Some(WriteEnd::Failed(e)),
                    }
                }
                () = abort.cancelled() => Some(WriteEnd::Aborted),
            };
            if let Some(end) = failed {
                // Every frame not completely written, for telling its sender.
                outbox.unwritten(&batch, written, unwritten);
                return end;
            }
        }
        // TLS may keep the end of the batch in its own buffer until flushed (for plain TCP
        // this does nothing). Bounded like a write.
        // Tried once first: done at once for plain TCP, so no timer is set per batch.
        let flushed = match futures_util::FutureExt::now_or_never(socket.flush()) {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(WriteEnd::Failed(e)),
            None => tokio::select! {
                flushed = tokio::time::timeout(write_timeout, socket.flush()) => match flushed {
                    Err(_) => Some(WriteEnd::SlowConsumer),
                    Ok(Err(e)) => Some(WriteEnd::Failed(e)),
                    Ok(Ok(())) => None,
                },
                () = abort.cancelled() => Some(WriteEnd::Aborted),
            },
        };
        if let Some(end) = flushed {
            return end;
        }
        outbox.written(batch);
    }
}
