//! The connection: [`Client::connect`] registers, then one task reads the socket and another
//! writes it; the program holds a cloneable [`Client`] to send and an [`Events`] stream to
//! receive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use relay_proto::{
    FrameReader, Identity, Kind, Message, MessageCodec, MessageRef, ProtoError, ServerEvent,
    Source, Status, User, decode_ref, encoded_len_ref, parse_destination, read_chat, validate_name,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use crate::error::{ConnectError, SendError};
use crate::event::Event;
use crate::incoming::{Events, Incoming, Item, Pending, Run};
use crate::outgoing::{NowError, Outgoing};
use crate::tls::Tls;

/// Connection settings. `ClientConfig::default()` suits a server with default limits.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Time allowed for the TCP connection (default 5 s).
    pub connect_timeout: Duration,
    /// Time allowed for the server to answer the registration (default 5 s).
    pub register_timeout: Duration,
    /// Largest frame sent or accepted; match the server's (default 64 KiB).
    pub max_frame_len: usize,
    /// Messages that may wait for the writer before [`Client::send`] waits (default 1024).
    pub send_queue: usize,
    /// Events that may wait for the program before the reader stops reading (default 1024).
    /// A program that never reads events is eventually dropped by the server as a slow
    /// consumer, which is the point: the backlog is bounded.
    pub event_queue: usize,
    /// How long [`Client::offline`] waits for the server to close the session (default 5 s).
    pub close_timeout: Duration,
    /// After this long without hearing from the server the client pings it (default 30 s).
    pub ping_interval: Duration,
    /// If the server sends nothing, not even a pong, for this long, the connection is given
    /// up with [`Event::Disconnected`] (default 90 s). This is how a client notices a server
    /// whose host vanished, which TCP alone may not report for many minutes.
    pub idle_timeout: Duration,
    /// The key to register with (default none: a guest, who may use names no key holds).
    /// The first registration of a name with a key binds the name to it; later ones prove it.
    /// See [`crate::load_or_create_key`].
    pub identity: Option<Identity>,
    /// Messages numbered at or below this were already handed to the program (by an earlier
    /// run that saved [`Event::seq`]); they are dropped if delivered again (default 0).
    pub resume_after: u64,
    /// Connect over TLS, trusting the server as this says (default none: plain TCP).
    pub tls: Option<Tls>,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            register_timeout: Duration::from_secs(5),
            max_frame_len: relay_proto::DEFAULT_MAX_FRAME_LEN,
            send_queue: 1024,
            event_queue: 1024,
            close_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            identity: None,
            resume_after: 0,
            tls: None,
        }
    }
}

/// Options for a connection, then [`ClientBuilder::connect`]:
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let (key, _created) = relay_client::load_or_create_key("alice.key".as_ref())?;
/// let (alice, events) = relay_client::Client::builder("127.0.0.1:8080", "alice")
///     .identity(key)
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ClientBuilder {
    server: String,
    name: String,
    config: ClientConfig,
}

impl ClientBuilder {
    /// Connects over TLS (see [`ClientConfig::tls`]).
    pub fn tls(mut self, tls: Tls) -> ClientBuilder {
        self.config.tls = Some(tls);
        self
    }

    /// Registers with this key (see [`ClientConfig::identity`]).
    pub fn identity(mut self, identity: Identity) -> ClientBuilder {
        self.config.identity = Some(identity);
        self
    }

    /// Drop messages numbered at or below `seq`: the last [`Event::seq`] an earlier run of
    /// this program handed on, so a message it took but could not acknowledge before it
    /// stopped is not shown twice.
    pub fn resume_after(mut self, seq: u64) -> ClientBuilder {
        self.config.resume_after = seq;
        self
    }

    /// Every other setting at once.
    pub fn config(mut self, config: ClientConfig) -> ClientBuilder {
        let identity = self.config.identity.take();
        self.config = config;
        self.config.identity = self.config.identity.take().or(identity);
        self
    }

    /// Time allowed for the TCP connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.config.connect_timeout = timeout;
        self
    }

    /// Time allowed for the greeting and the registration (default 5 s).
    pub fn register_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.config.register_timeout = timeout;
        self
    }

    /// Connects and registers.
    ///
    /// # Errors
    /// See [`Client::connect_with`].
    pub async fn connect(self) -> Result<(Client, Events), ConnectError> {
        Client::connect_with(&self.server, &self.name, self.config).await
    }
}

/// A registered connection to a relay server. Cheap to clone; all clones share the
/// connection, which closes when [`Client::offline`] is called or the server ends it.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use relay_client::{Client, Event};
///
/// let (alice, mut events) = Client::connect("127.0.0.1:8080", "alice").await?;
/// let id = alice.send("bob", "hello").await?;
/// while let Some(event) = events.next().await {
///     match event {
///         Event::Message { from, content, .. } => {
///             println!("{from}: {}", String::from_utf8_lossy(&content));
///         }
///         Event::NotFound { id: about, to } if about == id => println!("{to} is not online"),
///         Event::ServerShutdown { .. } => break,
///         _ => {}
///     }
/// }
/// alice.offline().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    outgoing: Arc<Outgoing>,
    next_id: AtomicU64,
    name: String,
    local_addr: SocketAddr,
    server_addr: SocketAddr,
    max_frame_len: usize,
    close_timeout: Duration,
    /// Set by `offline`: from then on the reader drops events the program does not take.
    going_offline: Arc<AtomicBool>,
    /// The events' queue, so that `offline` can release a reader waiting on it.
    incoming: Arc<Incoming>,
    /// Cancelled when the reader task ends (the server closed the connection).
    reader_done: CancellationToken,
    /// Cancelled when the writer task ends (everything handed to it was written).
    writer_done: CancellationToken,
}

impl Client {
    /// Options for connecting to `server` (`host:port`) as `name`.
    pub fn builder(server: impl Into<String>, name: impl Into<String>) -> ClientBuilder {
        ClientBuilder { server: server.into(), name: name.into(), config: ClientConfig::default() }
    }

    /// Connects to `server` (`host:port`) and registers as `name`, as a guest, with default
    /// settings.
    ///
    /// # Errors
    /// See [`Client::connect_with`].
    pub async fn connect(server: &str, name: &str) -> Result<(Client, Events), ConnectError> {
        Client::connect_with(server, name, ClientConfig::default()).await
    }

    /// Connects to `server` (`host:port`) and registers as `name`.
    ///
    /// Returns once the server has confirmed the registration.
    ///
    /// # Errors
    /// [`ConnectError::InvalidName`] before any network traffic if the name breaks the rules;
    /// [`ConnectError::Connect`] or [`ConnectError::ConnectTimeout`] if the server cannot be
    /// reached; [`ConnectError::Tls`] if [`ClientConfig::tls`] is set and the server's
    /// certificate does not verify (nothing is sent then) or it does not speak TLS;
    /// [`ConnectError::NameTaken`] or [`ConnectError::Refused`] if the server says
    /// no; [`ConnectError::RegisterTimeout`], [`ConnectError::Closed`] or
    /// [`ConnectError::Protocol`] if it does not answer properly.
    pub async fn connect_with(
        server: &str,
        name: &str,
        config: ClientConfig,
    ) -> Result<(Client, Events), ConnectError> {
        validate_name(name).map_err(|e| ConnectError::InvalidName {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(server))
            .await
            .map_err(|_| ConnectError::ConnectTimeout { addr: server.to_string() })?
            .map_err(|source| ConnectError::Connect { addr: server.to_string(), source })?;
        let io_error = |source| ConnectError::Connect { addr: server.to_string(), source };
        // Frames are batched by the writer task, so Nagle would only add latency.
        stream.set_nodelay(true).map_err(io_error)?;
        let local_addr = stream.local_addr().map_err(io_error)?;
        let server_addr = stream.peer_addr().map_err(io_error)?;
        let codec = MessageCodec::new(config.max_frame_len);
        let at = Addresses { server, local_addr, server_addr };
        let Some(tls) = config.tls.clone() else {
            let (read, write) = stream.into_split();
            let frames = FrameReader::new(read, codec);
            return Client::start(frames, write, None, at, name, config).await;
        };
        let tls_error = |reason| ConnectError::Tls { addr: server.to_string(), reason };
        let host = crate::tls::server_name(server)
            .ok_or_else(|| tls_error(format!("'{server}' has no host name to check")))?;
        let stream =
            tokio::time::timeout(config.connect_timeout, tls.connector().connect(host, stream))
                .await
                .map_err(|_| tls_error("the TLS handshake did not finish in time".into()))?
                .map_err(|e| tls_error(crate::tls::explain(&e)))?;
        // A key's signature covers the session's exporter value: a machine in the middle with
        // its own session to the server could not pass this login on.
        let mut binding = [0u8; relay_proto::TLS_BINDING_LEN];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, relay_proto::TLS_EXPORTER_LABEL, None)
            .map_err(|e| tls_error(format!("no exporter value: {e}")))?;
        let (read, write) = tokio::io::split(stream);
        let frames = FrameReader::new(relay_proto::Stream::new(read), codec);
        Client::start(frames, write, Some(binding), at, name, config).await
    }

    /// Registers over a connected transport and starts the reader and writer tasks.
    async fn start<S, W>(
        mut frames: FrameReader<S>,
        mut write: W,
        tls: Option<[u8; relay_proto::TLS_BINDING_LEN]>,
        at: Addresses<'_>,
        name: &str,
        config: ClientConfig,
    ) -> Result<(Client, Events), ConnectError>
    where
        S: Source,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let Addresses { server, local_addr, server_addr } = at;
        let io_error = |source| ConnectError::Connect { addr: server.to_string(), source };
        let deadline = Instant::now() + config.register_timeout;
        let timed_out = || ConnectError::RegisterTimeout(config.register_timeout);

        // Version 2: hello, and the greeting with the nonce a key signs.
        send_frame(&mut write, &Message::hello(1), config.max_frame_len).await.map_err(io_error)?;
        // The first frame tells a relay server from anything else listening there.
        let first =
            tokio::time::timeout_at(deadline, frames.next()).await.map_err(|_| timed_out())?;
        let first = match first {
            None => Err(ConnectError::Closed),
            Some(Err(ProtoError::FrameTooLarge { len, .. })) => {
                // Its "length" is its first four bytes: `HTTP` for a web server, a TLS record
                // header (content type 20 to 23, version 3.x) for a TLS port.
                let head = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
                if (20..=23).contains(&head[0]) && head[1] == 3 {
                    Err(not_relay(server, "with TLS: connect with --tls"))
                } else {
                    Err(not_relay(server, &format!("\"{}…\"", relay_proto::printable(&head))))
                }
            }
            Some(Err(ProtoError::Malformed(_))) => {
                Err(not_relay(server, "something that is not a relay greeting"))
            }
            Some(Err(e)) => Err(ConnectError::Protocol(e.to_string())),
            Some(Ok(msg)) => ServerEvent::parse(msg).map_err(ConnectError::Protocol),
        };
        let greeting = match first? {
            ServerEvent::Greeting { greeting, .. } => greeting,
            ServerEvent::Reply { status, detail, .. } => {
                return Err(refusal(name, status, detail));
            }
            other => {
                return Err(ConnectError::Protocol(format!("expected a greeting, got {other:?}")));
            }
        };
        // Never send more than the server takes.
        let max_frame_len = config.max_frame_len.min(greeting.max_frame_len);
        let register = match &config.identity {
            Some(identity) => {
                let credentials = identity.credentials_bound(&greeting.nonce, name, tls.as_ref());
                Message::register_with_key(2, name, credentials)
            }
            None => Message::register(2, name),
        };
        send_frame(&mut write, &register, max_frame_len).await.map_err(io_error)?;
        let reply = next_event(&mut frames, deadline).await.ok_or_else(timed_out)??;
        // Many clients mostly wait: keep no read buffer until traffic comes.
        frames.release_if_empty();
        let registered_as = match reply {
            ServerEvent::Reply { status: Status::Registered, to, .. } => to,
            ServerEvent::Reply { status, detail, .. } => return Err(refusal(name, status, detail)),
            other => {
                return Err(ConnectError::Protocol(format!(
                    "expected a registration reply, got {other:?}"
                )));
            }
        };
        let name = if registered_as.is_empty() { name } else { registered_as.as_str() };

        let outgoing = Arc::new(Outgoing::new(MessageCodec::new(max_frame_len), config.send_queue));
        let incoming = Incoming::new(config.event_queue);
        let inner = Arc::new(Inner {
            outgoing: outgoing.clone(),
            // Ids 1 and 2 were the hello and the registration; 0 means "the connection".
            // Later ones start from the clock, so receipts for an earlier session's messages
            // (which can arrive in this one) never name this session's ids.
            next_id: AtomicU64::new(first_id()),
            name: name.to_string(),
            local_addr,
            server_addr,
            max_frame_len,
            close_timeout: config.close_timeout,
            going_offline: Arc::new(AtomicBool::new(false)),
            incoming: incoming.clone(),
            reader_done: CancellationToken::new(),
            writer_done: CancellationToken::new(),
        });
        tokio::spawn(write_loop(
            outgoing.clone(),
            write,
            inner.reader_done.clone(),
            inner.writer_done.clone(),
        ));
        tokio::spawn(
            Reader {
                events: incoming.clone(),
                batch: Pending::default(),
                last_from: None,
                last_from_checked: Vec::new(),
                last_to: Vec::new(),
                // Not a `Client`: when the program drops every `Client`, the connection ends
                // (see `Drop for Inner`), even though the reader still runs.
                outgoing,
                going_offline: inner.going_offline.clone(),
                pending_users: Vec::new(),
                pending_bytes: 0,
                last_seq: config.resume_after,
                ping_interval: config.ping_interval,
                idle_timeout: config.idle_timeout.max(config.ping_interval),
            }
            .run(frames, inner.reader_done.clone()),
        );
        // A keyed session acknowledges what the program took: the server then sends receipts
        // and keeps nothing more for it (a guest's messages are never kept).
        let acks = config.identity.is_some().then(|| inner.outgoing.clone());
        Ok((Client { inner }, Events::new(incoming, acks)))
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This end's address; other clients may address messages to it as the server sees it
    /// (the same unless there is NAT in between).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.server_addr
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn submit(&self, msg: &MessageRef<'_>) -> Result<u64, SendError> {
        match self.inner.outgoing.push(msg).await {
            Ok(Ok(())) => Ok(msg.id),
            // Sizes are checked before submitting; this only guards the frame limit.
            Ok(Err(_)) => Err(SendError::TooLarge {
                len: encoded_len_ref(msg),
                max: self.inner.max_frame_len,
            }),
            Err(_) => Err(SendError::Closed),
        }
    }

    /// Sends `content` to `to`, a user name or a client's `ip:port`, and returns the id that
    /// any reply about it ([`Event::NotFound`], [`Event::Rejected`]) will carry.
    ///
    /// Returns once the message is queued for the writer; waits only if the writer is that
    /// far behind. Messages to one receiver arrive in the order they were sent.
    ///
    /// # Errors
    /// [`SendError::InvalidDestination`] or [`SendError::TooLarge`] before anything is sent;
    /// [`SendError::Closed`] if the connection is closed.
    pub async fn send(&self, to: &str, content: impl AsRef<[u8]>) -> Result<u64, SendError> {
        let msg = self.checked(to, content.as_ref())?;
        self.submit(&msg).await
    }

    /// A chat message for `to` with the next id, if the destination is valid and it fits
    /// the frame limit.
    fn checked<'a>(&self, to: &'a str, content: &'a [u8]) -> Result<MessageRef<'a>, SendError> {
        check_destination(to)?;
        self.sized(to, content)
    }

    /// A chat message for `to` (already checked) with the next id, if it fits the frame limit.
    fn sized<'a>(&self, to: &'a str, content: &'a [u8]) -> Result<MessageRef<'a>, SendError> {
        let msg = MessageRef::send(self.next_id(), to, content);
        let len = encoded_len_ref(&msg);
        if len > self.inner.max_frame_len {
            return Err(SendError::TooLarge { len, max: self.inner.max_frame_len });
        }
        Ok(msg)
    }

    /// Starts a [`Batch`]: messages added to it are encoded at once and handed to the writer
    /// together, which costs one lock and at most one wake-up for the lot instead of one per
    /// message. For programs that send in bursts.
    pub fn batch(&self) -> Batch {
        Batch { client: self.clone(), frames: BytesMut::new(), count: 0, checked_to: String::new() }
    }

    /// Asks for the users online; the answer arrives as [`Event::Users`] with the returned id.
    ///
    /// # Errors
    /// [`SendError::Closed`] if the connection is closed.
    pub async fn list_users(&self) -> Result<u64, SendError> {
        self.submit(&Message::list_users(self.next_id()).as_ref()).await
    }

    /// Asks for the next page of a long listing: the users after `after`, the `next` of the
    /// page before ([`Event::Users`]). The answer arrives as [`Event::Users`] with the
    /// returned id. A server limits how often a client may list (then the answer is
    /// [`Event::Rejected`] with [`Status::RateLimited`]).
    ///
    /// # Errors
    /// [`SendError::InvalidDestination`] if `after` is not a valid name;
    /// [`SendError::Closed`] if the connection is closed.
    pub async fn list_users_after(&self, after: &str) -> Result<u64, SendError> {
        validate_name(after).map_err(|e| SendError::InvalidDestination {
            to: after.to_string(),
            reason: e.to_string(),
        })?;
        self.submit(&Message::list_users_after(self.next_id(), after).as_ref()).await
    }

    /// Goes offline: tells the server, which frees the name and closes the connection. Returns
    /// once everything sent before was written and the server closed the session (or after
    /// [`ClientConfig::close_timeout`]). Events still arriving are dropped if the program is
    /// not taking them. Calling it on a closed connection does nothing.
    ///
    /// # Errors
    /// [`SendError::Closed`] only if the server did not close the session in time.
    pub async fn offline(&self) -> Result<(), SendError> {
        self.inner.going_offline.store(true, Ordering::Relaxed);
        // A reader already waiting for the program to take events (one that reads none)
        // must not hold the close: it stops waiting, and drops what does not fit.
        self.inner.incoming.leave();
        self.inner.outgoing.close(Some(&Message::offline(self.next_id()).as_ref()));
        let both = async {
            self.inner.writer_done.cancelled().await;
            self.inner.reader_done.cancelled().await;
        };
        tokio::time::timeout(self.inner.close_timeout, both).await.map_err(|_| SendError::Closed)
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.inner.reader_done.is_cancelled()
    }
}

/// Messages encoded and waiting to be handed to the writer together; see [`Client::batch`].
/// Reusable: [`Batch::send`] leaves it empty. Messages dropped with an unsent batch are never
/// sent.
#[derive(Debug)]
pub struct Batch {
    client: Client,
    frames: BytesMut,
    count: usize,
    /// The last destination that passed the checks: a burst to one receiver checks its name
    /// once, not once per message.
    checked_to: String,
}

impl Batch {
    /// Adds a message for `to` (a user name or a client's `ip:port`) and returns the id any
    /// reply about it will carry, as [`Client::send`] would. Nothing is sent until
    /// [`Batch::send`].
    ///
    /// # Errors
    /// [`SendError::InvalidDestination`] or [`SendError::TooLarge`]; the batch is unchanged.
    pub fn add(&mut self, to: &str, content: impl AsRef<[u8]>) -> Result<u64, SendError> {
        if to != self.checked_to {
            check_destination(to)?;
            self.checked_to.clear();
            self.checked_to.push_str(to);
        }
        // The encoder checks the frame limit (with the same limit): no separate size check.
        let msg = MessageRef::send(self.client.next_id(), to, content.as_ref());
        self.client.inner.outgoing.encode(&msg, &mut self.frames).map_err(|_| {
            SendError::TooLarge { len: encoded_len_ref(&msg), max: self.client.inner.max_frame_len }
        })?;
        self.count += 1;
        Ok(msg.id)
    }

    /// The connection the batch sends on.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Messages added and not yet sent.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if nothing was added since the last send.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Hands every message added to the writer, in the order added, after anything sent
    /// before; waits only if the writer is far behind. Leaves the batch empty.
    ///
    /// # Errors
    /// [`SendError::Closed`] if the connection is closed; the batch's messages are dropped.
    pub async fn send(&mut self) -> Result<(), SendError> {
        if self.count == 0 {
            return Ok(());
        }
        let count = std::mem::take(&mut self.count);
        let sent = self.client.inner.outgoing.push_encoded(&mut self.frames, count).await;
        self.frames.clear();
        sent.map_err(|_| SendError::Closed)
    }
}

impl Drop for Inner {
    /// The program dropped its last `Client`: end the connection, as `offline` would, minus
    /// the notice (the server frees the name when the connection closes).
    fn drop(&mut self) {
        self.outgoing.close(None);
    }
}

/// Whether `to` is a valid destination: a user name or a client's `ip:port`.
fn check_destination(to: &str) -> Result<(), SendError> {
    parse_destination(to)
        .map(|_| ())
        .map_err(|e| SendError::InvalidDestination { to: to.to_string(), reason: e.to_string() })
}

/// Where a connection goes, and from where.
struct Addresses<'a> {
    server: &'a str,
    local_addr: std::net::SocketAddr,
    server_addr: std::net::SocketAddr,
}

/// Encodes and writes one frame (during the handshake, before the writer task runs).
async fn send_frame<W: AsyncWrite + Unpin>(
    write: &mut W,
    msg: &Message,
    max_frame_len: usize,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    MessageCodec::new(max_frame_len)
        .encode(msg, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    write.write_all(&buf).await
}

/// The next message of the handshake as a [`ServerEvent`]; `None` at `deadline`.
async fn next_event<S: Source>(
    frames: &mut FrameReader<S>,
    deadline: Instant,
) -> Option<Result<ServerEvent, ConnectError>> {
    let frame = tokio::time::timeout_at(deadline, frames.next()).await.ok()?;
    Some(match frame {
        None => Err(ConnectError::Closed),
        Some(Err(e)) => Err(ConnectError::Protocol(e.to_string())),
        Some(Ok(msg)) => ServerEvent::parse(msg).map_err(ConnectError::Protocol),
    })
}

/// The error for a peer at `addr` that is not a relay server.
fn not_relay(addr: &str, answered: &str) -> ConnectError {
    ConnectError::NotRelay { addr: addr.to_string(), answered: answered.to_string() }
}

/// The error for a registration the server refused with `status`.
fn refusal(name: &str, status: Status, detail: String) -> ConnectError {
    let name = name.to_string();
    match status {
        Status::NameTaken => ConnectError::NameTaken { name },
        Status::NameOwned => ConnectError::NameOwned { name, detail },
        Status::NameConfusable => ConnectError::LooksLike { name, detail },
        Status::InvalidName => ConnectError::InvalidName { name, reason: detail },
        Status::AuthFailed => ConnectError::AuthFailed { detail },
        Status::AuthRequired => ConnectError::AuthRequired,
        status => ConnectError::Refused { status, detail },
    }
}

/// Writes whatever is queued, many frames per syscall, until the outbox is closed and written
/// (offline, or every `Client` dropped), the reader has given up on the connection, or the
/// socket fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    outgoing: Arc<Outgoing>,
    mut socket: W,
    reader_done: CancellationToken,
    done: CancellationToken,
) {
    let mut buf = BytesMut::new();
    loop {
        let more = tokio::select! {
            more = outgoing.take(&mut buf) => more,
            // The connection is over: closed by the server, or given up as dead.
            () = reader_done.cancelled() => break,
        };
        if !more {
            break;
        }
        // Flushed too: TLS may keep the end of a batch in its own buffer otherwise (a no-op
        // for plain TCP).
        let written = tokio::select! {
            written = async {
                socket.write_all_buf(&mut buf).await?;
                socket.flush().await
            } => written.is_ok(),
            // A server that stopped reading must not hold the writer once the reader has
            // given up on it.
            () = reader_done.cancelled() => false,
        };
        if !written {
            break;
        }
        buf.clear();
        if buf.capacity() > 64 * 1024 {
            buf = BytesMut::new();
        }
    }
    // Whatever ended the writer, nothing more can be sent.
    outgoing.close(None);
    let _ = socket.shutdown().await;
    done.cancel();
}

/// Most users one listing may hold. Far above any real server's connection limit; it only
/// stops a hostile server from growing a listing forever.
const MAX_LISTED_USERS: usize = 1_000_000;

/// Most bytes of names and addresses one listing may hold: a real listing is under 100 bytes
/// a user, so this is 160,000 users; a server sending endless huge "names" is stopped here.
const MAX_LISTED_BYTES: usize = 16 * 1024 * 1024;

/// The first id of a session's messages: the time in ms, shifted so a session can send
/// 2^20 messages per millisecond it has lasted before its ids meet a later session's.
fn first_id() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    (ms << 20).max(3)
}

/// The reader task's state.
struct Reader {
    events: Arc<Incoming>,
    /// Events from the current read, handed to the program together before the next read.
    batch: Pending,
    /// The sender of the last message: consecutive messages from one sender share the name.
    last_from: Option<Arc<str>>,
    /// The last sender's name checked as text for a run (see [`Reader::take_run`]).
    last_from_checked: Vec<u8>,
    /// The destination of the last message (this client's name as its sender wrote it),
    /// known to be valid text.
    last_to: Vec<u8>,
    /// For answering pings.
    outgoing: Arc<Outgoing>,
    going_offline: Arc<AtomicBool>,
    /// The highest sequence number seen: anything numbered at or below it is a duplicate
    /// (delivered again after a reconnect) and dropped.
    last_seq: u64,
    /// A user listing arriving in parts.
    pending_users: Vec<User>,
    /// Bytes of names and addresses in `pending_users`.
    pending_bytes: usize,
    ping_interval: Duration,
    idle_timeout: Duration,
}

impl Reader {
    async fn run<S: Source>(mut self, mut frames: FrameReader<S>, done: CancellationToken) {
        let mut last_heard = Instant::now();
        let mut ping_id: u64 = 0;
        let mut pinged = false;
        // Re-armed only when it fires, so a busy connection pays nothing per frame for it.
        let timer = tokio::time::sleep_until(last_heard + self.ping_interval);
        tokio::pin!(timer);
        loop {
            // Every complete frame already read is handled before going back to the select, so
            // a busy connection pays for the select and the clock once per read, not per frame.
            // Chat messages first, as many as follow each other, in one piece.
            if self.take_run(&mut frames) {
                continue;
            }
            let frame = match frames.buffered_frame() {
                Ok(Some(frame)) => Ok(frame),
                Err(e) => Err(e.to_string()),
                Ok(None) => {
                    // Everything from the last read goes to the program before the next.
                    self.flush().await;
                    let filled = tokio::select! {
                        filled = frames.fill() => filled,
                        () = &mut timer => {
                            // Quiet for a while: give back the read buffer.
                            frames.release_if_empty();
                            let silent = last_heard.elapsed();
                            if silent >= self.idle_timeout {
                                let reason =
                                    format!("the server stopped answering ({silent:.0?} silent)");
                                self.emit(Event::Disconnected { reason });
                                break;
                            }
                            if silent >= self.ping_interval && !pinged {
                                pinged = true;
                                ping_id += 1;
                                // Never waits: a full queue means traffic is flowing anyway.
                                let _ = self.outgoing.push_now(&Message::ping(ping_id).as_ref());
                            }
                            let next = if pinged { self.idle_timeout } else { self.ping_interval };
                            timer.as_mut().reset(last_heard + next);
                            continue;
                        }
                    };
                    match filled {
                        Ok(true) => {
                            last_heard = Instant::now();
                            pinged = false;
                            continue;
                        }
                        Ok(false) => Err("the server closed the connection".to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            let event = frame.and_then(|frame| self.read_frame(frame).map_err(|e| e.to_string()));
            let event = match event {
                Ok(None) => continue,
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(e))) => {
                    let reason = format!("protocol error from the server: {e}");
                    self.emit(Event::Disconnected { reason });
                    break;
                }
                Err(reason) => {
                    if !self.going_offline.load(Ordering::Relaxed) {
                        self.emit(Event::Disconnected { reason });
                    }
                    break;
                }
            };
            if self.handle(event).is_break() {
                break;
            }
        }
        self.flush().await;
        self.events.end();
        done.cancel();
    }

    /// Decodes one frame. A chat message, nearly all of the traffic, becomes an event at once,
    /// its content the frame itself trimmed to the content (no copy) and its sender's name
    /// shared with the previous message's when it is the same (no allocation, and no UTF-8
    /// check of names already checked); anything else comes back as a [`ServerEvent`] (or why
    /// it is not a valid one) for [`Reader::handle`].
    fn read_frame(
        &mut self,
        mut frame: BytesMut,
    ) -> Result<Option<Result<ServerEvent, String>>, relay_proto::ProtoError> {
        if let Some(chat) = read_chat(&frame)
            && self.known_destination(chat.to)
            && let Some(from) = self.sender(chat.from)
        {
            let (id, len, seq, time) = (chat.id, chat.content.len(), chat.seq, chat.time);
            if self.duplicate(seq) {
                return Ok(None);
            }
            let offset = chat.content.as_ptr() as usize - frame.as_ptr() as usize;
            // Trimming the frame to the content, rather than slicing it, saves a reference
            // count increment and decrement per message.
            frame.advance(offset);
            frame.truncate(len);
            self.emit(Event::Message { id, from, content: frame.freeze(), seq, time });
            return Ok(None);
        }
        // Anything else (or a chat message with a name that is not UTF-8: decoding says so).
        let msg = decode_ref(&frame)?;
        if msg.kind == Kind::Delivered && !msg.register && !msg.exit {
            // A receipt per batch of messages sent: read in place, without an owned copy of
            // the frame first.
            if !msg.content.len().is_multiple_of(8) {
                return Ok(Some(Err("a receipt's ids are not whole u64s".into())));
            }
            if !self.duplicate(msg.seq) {
                let ids = msg
                    .content
                    .chunks_exact(8)
                    .map(|id| u64::from_le_bytes(id.try_into().unwrap_or_default()))
                    .collect();
                let (to, time, seq) = (msg.to.to_owned(), msg.time, msg.seq);
                self.emit(Event::Delivered { to, ids, time, seq });
            }
            return Ok(None);
        }
        Ok(Some(ServerEvent::parse(msg.to_message())))
    }

    /// Takes the chat messages at the front of what was read, as many as follow each other,
    /// into one [`Run`] for the program: each is checked here as [`Reader::read_frame`]
    /// checks one (well formed, names valid text, not a duplicate), and the program reads
    /// them in place. `false` if the next frame is not such a message (or there is none).
    fn take_run<S: Source>(&mut self, frames: &mut FrameReader<S>) -> bool {
        let (mut count, mut last_seq) = (0, 0);
        let run = frames.take_run(|body| self.accept_chat(body, &mut count, &mut last_seq));
        let Some(run) = run else { return false };
        self.batch.push(Item::Run(Run::new(run.freeze(), count, last_seq)));
        true
    }

    /// Whether `body` is a chat message that can go into a run; if so, counts it.
    fn accept_chat(&mut self, body: &[u8], count: &mut usize, last_seq: &mut u64) -> bool {
        let Some(chat) = read_chat(body) else { return false };
        // A duplicate ends the run: `read_frame` acknowledges and drops it.
        let fresh = chat.seq == 0 || chat.seq > self.last_seq;
        if !fresh || !self.known_destination(chat.to) || !self.checked_sender(chat.from) {
            return false;
        }
        if chat.seq != 0 {
            (self.last_seq, *last_seq) = (chat.seq, chat.seq);
        }
        *count += 1;
        true
    }

    /// Whether `from`, a chat message's sender, is valid text.
    fn checked_sender(&mut self, from: &[u8]) -> bool {
        text_as_before(&mut self.last_from_checked, from)
    }

    /// Whether `to`, a chat message's destination (this client's name, as its sender wrote
    /// it), is valid text.
    fn known_destination(&mut self, to: &[u8]) -> bool {
        text_as_before(&mut self.last_to, to)
    }

    /// The sender's name: shared with the previous message's when it is the same, otherwise
    /// checked as UTF-8 and kept for the next. `None` if it is not valid text.
    fn sender(&mut self, from: &[u8]) -> Option<Arc<str>> {
        if let Some(last) = &self.last_from
            && last.as_bytes() == from
        {
            return Some(last.clone());
        }
        let from = std::str::from_utf8(from).ok()?;
        Some(self.last_from.insert(Arc::from(from)).clone())
    }

    /// Whether a message numbered `seq` was seen already (then it is acknowledged again, so
    /// the server forgets it, and dropped).
    fn duplicate(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq <= self.last_seq {
            // Acknowledged up to itself only: what came after it may not be handed over yet.
            let _ = self.outgoing.push_now(&Message::ack(seq).as_ref());
            return true;
        }
        self.last_seq = seq;
        false
    }

    fn handle(&mut self, event: ServerEvent) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        let event = match event {
            ServerEvent::Message { id, from, content, seq, time } => {
                if self.duplicate(seq) {
                    return Continue(());
                }
                Event::Message { id, from: from.into(), content, seq, time }
            }
            ServerEvent::Delivered { to, ids, time, seq } => {
                if self.duplicate(seq) {
                    return Continue(());
                }
                Event::Delivered { to, ids, time, seq }
            }
            // Only sent during the handshake; later, a server bug, and harmless.
            ServerEvent::Greeting { .. } => return Continue(()),
            ServerEvent::Users { id, users, complete, next } => {
                self.pending_bytes +=
                    users.iter().map(|u| u.name.len() + u.addr.len()).sum::<usize>();
                self.pending_users.extend(users);
                if self.pending_users.len() > MAX_LISTED_USERS
                    || self.pending_bytes > MAX_LISTED_BYTES
                {
                    // A listing that never ends is a server trying to exhaust our memory.
                    let reason = format!(
                        "the server sent a user list of over {MAX_LISTED_USERS} users or \
                         {MAX_LISTED_BYTES} bytes"
                    );
                    self.emit(Event::Disconnected { reason });
                    return Break(());
                }
                if !complete {
                    return Continue(());
                }
                self.pending_bytes = 0;
                Event::Users { id, users: std::mem::take(&mut self.pending_users), next }
            }
            ServerEvent::Reply { status, detail, closing: true, .. } => {
                let event = if status == Status::ShuttingDown {
                    Event::ServerShutdown { detail }
                } else {
                    Event::Closed { status, detail }
                };
                self.emit(event);
                return Break(());
            }
            ServerEvent::Reply { id, status: Status::NotFound, to, .. } => {
                Event::NotFound { id, to }
            }
            ServerEvent::Reply { id, status: Status::Stored, to, .. } => Event::Stored { id, to },
            ServerEvent::Reply { id, status, to, detail, .. } => {
                Event::Rejected { id, status, to, detail }
            }
            ServerEvent::Ping { id } => {
                if let Err(NowError::Full) = self.outgoing.push_now(&Message::pong(id).as_ref()) {
                    // Pongs pile up unread: the server pings without reading the answers.
                    let reason = "the server sends pings but reads none of the answers".into();
                    self.emit(Event::Disconnected { reason });
                    return Break(());
                }
                return Continue(());
            }
            ServerEvent::Pong { .. } => return Continue(()),
        };
        self.emit(event);
        Continue(())
    }

    /// Queues an event for the program; it is handed over by the next [`Reader::flush`].
    fn emit(&mut self, event: Event) {
        self.batch.push(Item::Event(event));
    }

    /// Hands the queued events to the program, waiting for it to make room if it is behind.
    async fn flush(&mut self) {
        // The program is leaving and may not be reading: never block the close on it.
        let wait = !self.going_offline.load(Ordering::Relaxed);
        self.events.deliver(&mut self.batch, wait).await;
    }
}

/// Whether `bytes` are valid text: the same bytes as `last`, the last ones checked, or checked
/// now and kept in `last` (a client sees the same names over and over).
fn text_as_before(last: &mut Vec<u8>, bytes: &[u8]) -> bool {
    if **last == *bytes {
        return true;
    }
    if std::str::from_utf8(bytes).is_err() {
        return false;
    }
    last.clear();
    last.extend_from_slice(bytes);
    true
}

/// The receiving side's per-frame work, without a connection, for the criterion benches
/// (`cargo bench -p relay-client`); see [`crate::bench`].
pub(crate) struct FrameDecoder {
    reader: Reader,
    codec: MessageCodec,
}

impl FrameDecoder {
    pub(crate) fn new() -> FrameDecoder {
        let codec = MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN);
        let reader = Reader {
            events: Incoming::new(usize::MAX),
            batch: Pending::default(),
            last_from: None,
            last_from_checked: Vec::new(),
            last_to: Vec::new(),
            outgoing: Arc::new(Outgoing::new(
                MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN),
                1 << 20,
            )),
            going_offline: Arc::new(AtomicBool::new(false)),
            pending_users: Vec::new(),
            pending_bytes: 0,
            last_seq: 0,
            ping_interval: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
        };
        FrameDecoder { reader, codec }
    }

    /// Takes every complete frame off the front of `read` (what one socket read brought) as
    /// the connection's reader does; returns what it queued for the program.
    pub(crate) fn decode(&mut self, read: &mut BytesMut) -> &mut Pending {
        loop {
            let (mut count, mut last_seq) = (0, 0);
            let reader = &mut self.reader;
            let run = relay_proto::split_run(&self.codec, read, |body| {
                reader.accept_chat(body, &mut count, &mut last_seq)
            });
            if let Some(run) = run {
                self.reader.batch.push(Item::Run(Run::new(run.freeze(), count, last_seq)));
                continue;
            }
            let Ok(Some(len)) = self.codec.complete_frame(read) else { break };
            read.advance(relay_proto::FRAME_HEADER_LEN);
            let frame = read.split_to(len);
            if let Ok(Some(Ok(event))) = self.reader.read_frame(frame) {
                let _ = self.reader.handle(event);
            }
        }
        &mut self.reader.batch
    }
}
