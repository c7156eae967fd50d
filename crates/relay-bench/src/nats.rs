//! Just enough of the NATS client protocol to run the workloads against a nats-server: connect,
//! subscribe, publish, receive. It does what a fast NATS client does (many `PUB`s per write,
//! payloads sliced out of the read buffer without copying), so the comparison measures the
//! servers, not a slow client.
//!
//! Protocol reference: <https://docs.nats.io/reference/reference-protocols/nats-protocol>.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Longest control line accepted from the server (`INFO` lines are a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;
/// Largest payload accepted (nats-server's default `max_payload` is 1 MiB).
const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// Something the server sent.
enum ServerOp {
    Msg(Bytes),
    Ping,
    Pong,
    Other,
}

/// Reads and parses the server's side of a connection.
struct OpReader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl OpReader {
    /// The next operation, or `None` at end of stream.
    async fn next(&mut self) -> io::Result<Option<ServerOp>> {
        loop {
            if let Some(op) = self.parse()? {
                return Ok(Some(op));
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Parses one complete operation from the buffer, if there is one.
    fn parse(&mut self) -> io::Result<Option<ServerOp>> {
        let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            if self.buf.len() > MAX_LINE {
                return Err(protocol("control line too long"));
            }
            return Ok(None);
        };
        let line = &self.buf[..eol];
        if line.starts_with(b"MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let size = line
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n <= MAX_PAYLOAD)
                .ok_or_else(|| protocol("bad MSG line"))?;
            let needed = eol + 2 + size + 2;
            if self.buf.len() < needed {
                self.buf.reserve(needed - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(eol + 2);
            let payload = self.buf.split_to(size).freeze();
            self.buf.advance(2);
            return Ok(Some(ServerOp::Msg(payload)));
        }
        let op = if line == b"PING" {
            ServerOp::Ping
        } else if line == b"PONG" {
            ServerOp::Pong
        } else if line.starts_with(b"-ERR") {
            return Err(protocol(String::from_utf8_lossy(line).into_owned()));
        } else {
            ServerOp::Other // INFO, +OK
        };
        self.buf.advance(eol + 2);
        Ok(Some(op))
    }

    /// Reads until the server answers the `PING` just sent.
    async fn until_pong(&mut self) -> io::Result<()> {
        loop {
            match self.next().await? {
                Some(ServerOp::Pong) => return Ok(()),
                Some(_) => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }
}

/// Connects, says `CONNECT` and waits for the server to answer a `PING`, so it is ready.
async fn handshake(addr: &str, subscribe: Option<&str>) -> io::Result<(OpReader, OwnedWriteHalf)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = OpReader { read, buf: BytesMut::with_capacity(64 * 1024) };
    let mut hello = String::from(
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"relay-bench\"}\r\n",
    );
    if let Some(subject) = subscribe {
        hello.push_str(&format!("SUB {subject} 1\r\n"));
    }
    // The PONG proves the server has processed everything before it, subscriptions included.
    hello.push_str("PING\r\n");
    write.write_all(hello.as_bytes()).await?;
    reader.until_pong().await?;
    Ok((reader, write))
}

/// A connection that publishes.
pub struct Publisher {
    write: OwnedWriteHalf,
    buf: BytesMut,
    /// Answers the server's pings and surfaces its errors while we only write.
    reader: tokio::task::JoinHandle<io::Result<()>>,
}

impl Publisher {
    /// Connects to the nats-server at `addr` (`host:port`).
    pub async fn connect(addr: &str) -> io::Result<Publisher> {
        let (mut reader, write) = handshake(addr, None).await?;
        let reader = tokio::spawn(async move {
            // Pings would need the write half; the server allows two unanswered minutes of
            // them, far longer than any run, so they are only read and dropped.
            while reader.next().await?.is_some() {}
            Ok(())
        });
        Ok(Publisher { write, buf: BytesMut::with_capacity(64 * 1024), reader })
    }

    /// Queues a `PUB`; it is written by [`Publisher::flush`] or once enough is queued.
    pub async fn publish(&mut self, subject: &str, payload: &[u8]) -> io::Result<()> {
        self.buf.put_slice(b"PUB ");
        self.buf.put_slice(subject.as_bytes());
        self.buf.put_u8(b' ');
        self.buf.put_slice(payload.len().to_string().as_bytes());
        self.buf.put_slice(b"\r\n");
        self.buf.put_slice(payload);
        self.buf.put_slice(b"\r\n");
        if self.buf.len() >= 32 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.reader.is_finished() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "server closed"));
        }
        self.write.write_all_buf(&mut self.buf).await
    }

    /// Flushes, then waits until the server has processed everything published.
    pub async fn close(mut self) -> io::Result<()> {
        self.flush().await?;
        self.write.shutdown().await?;
        match self.reader.await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

/// A connection subscribed to one subject.
pub struct Subscriber {
    reader: OpReader,
    write: OwnedWriteHalf,
}

impl Subscriber {
    /// Connects to the nats-server at `addr` and subscribes to `subject`; returns once the
    /// subscription is in place.
    pub async fn connect(addr: &str, subject: &str) -> io::Result<Subscriber> {
        let (reader, write) = handshake(addr, Some(subject)).await?;
        Ok(Subscriber { reader, write })
    }

    /// The next message's payload if one is already buffered; never waits (a `PING` found on
    /// the way is answered later, by [`Subscriber::next`]).
    pub fn try_next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            // Stop before anything that needs an answer, so `next` still sees it.
            if self.reader.buf.starts_with(b"PING") {
                return Ok(None);
            }
            match self.reader.parse()? {
                Some(ServerOp::Msg(payload)) => return Ok(Some(payload)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    /// The next message's payload, or `None` once the server closed the connection.
    pub async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.reader.next().await? {
                Some(ServerOp::Msg(payload)) => return Ok(Some(payload)),
                Some(ServerOp::Ping) => self.write.write_all(b"PONG\r\n").await?,
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}
