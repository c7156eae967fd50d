//! One client connection: registration, then reading the client's messages and acting on
//! them, while the writer task sends what is queued for it.

use std::net::SocketAddr;
use std::sync::Arc;

use relay_proto::{
    AuthMode, FrameReader, Greeting, Kind, Message, MessageCodec, MessageRef, NONCE_LEN,
    ProtoError, Request, Source, Status, TLS_BINDING_LEN, decode_ref, encoded_len_ref, fresh_nonce,
    name_key, read_chat, verify_credentials_bound,
};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::config::Config;
use crate::keepalive::{Keepalive, Timing, Verdict};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, PushError, RunSource, Unwritten};
use crate::router::{
    Claim, ClaimRequest, Pending, Refused, RouteCache, Routed, Routing, Undelivered, now_ms,
};
use crate::writer::{self, WriteEnd};

/// The most messages queued under one lock for one receiver (see [`Outbox::push_run`]), so
/// that other senders and the receiver's writer wait for it only so long.
const MAX_RUN: usize = 256;

/// The rest of a sender's run of messages to one destination, read from the frames it has
/// buffered: each is a chat message to the same destination as the one just routed there
/// (which passed the name rules), within the frame limit once stamped.
struct Run<'a, S> {
    frames: &'a mut FrameReader<S>,
    to: &'a str,
    from: &'a str,
    time: u64,
    max_frame_len: usize,
    /// How many more messages this run may take.
    left: usize,
    /// Bytes of the frames taken, for the server's counters.
    bytes: u64,
    /// The length of the frame last peeked.
    peeked: usize,
}

impl<S: Source> RunSource for Run<'_, S> {
    fn peek(&mut self) -> Option<MessageRef<'_>> {
        if self.left == 0 {
            return None;
        }
        let body = self.frames.peek_body()?;
        let chat = read_chat(body)?;
        // The same destination (so it is valid text); a sender's field that is not text is
        // left for routing, which refuses the frame as it refuses any malformed one.
        if chat.to != self.to.as_bytes() || std::str::from_utf8(chat.from).is_err() {
            return None;
        }
        self.peeked = body.len();
        let mut msg = MessageRef::deliver(chat.id, self.from, self.to, chat.content);
        msg.time = self.time;
        // Checked in the larger (version 2) layout, whatever the receiver speaks, as routing
        // does; one over the limit is left for routing to refuse.
        (encoded_len_ref(&msg) <= self.max_frame_len).then_some(msg)
    }

    fn take(&mut self) {
        self.frames.take_peeked();
        self.left -= 1;
        self.bytes += self.peeked as u64 + 4;
    }
}

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) router: Arc<dyn Routing>,
    pub(crate) config: Config,
    /// Cancelled when the shutdown drain time runs out: writers stop at once.
    pub(crate) hard_stop: CancellationToken,
    /// Connections whose shutdown notice was written out in full (for the last log line).
    pub(crate) told_shutdown: std::sync::atomic::AtomicUsize,
    /// What the server counts.
    pub(crate) metrics: Arc<Metrics>,
}

/// Serves one client over plain TCP until it leaves, fails, or the server shuts down.
/// Not an `async fn`: the session's future is returned as it is, not wrapped in one more
/// that would keep room for its arguments in every idle connection's task.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    prepare(&stream, &shared, peer);
    let (read, write) = stream.into_split();
    serve_halves(read, write, None, peer, shared, shutdown)
}

/// Sets up an accepted socket, whatever runs over it.
pub(crate) fn prepare(stream: &TcpStream, shared: &Shared, peer: SocketAddr) {
    // Frames are batched by the writer, so Nagle's algorithm would only add latency.
    let _ = stream.set_nodelay(true);
    bound_kernel_unsent(stream, shared.config.kernel_unsent, peer);
}

/// Serves one client over any transport (its two halves): the transport seam. Plain TCP
/// reads through a TCP read half, TLS through [`relay_proto::Stream`]; `tls` is the TLS
/// session's exporter value, which a key's signature must cover.
pub(crate) async fn serve_halves<S, W>(
    read: S,
    write: W,
    tls: Option<[u8; TLS_BINDING_LEN]>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: Source,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let config = &shared.config;
    let outbox = Outbox::new(config.outbox_bytes);
    let metrics = &shared.metrics;
    metrics.connections.inc();
    metrics.connections_open.inc();
    let writer = tokio::spawn(writer::run(
        write,
        outbox.clone(),
        config.write_timeout,
        shared.hard_stop.clone(),
        metrics.bytes_out.clone(),
    ));
    let mut conn = Connection {
        frames: FrameReader::new(read, MessageCodec::new(config.pre_register_limit())),
        outbox: outbox.clone(),
        peer,
        shared: shared.clone(),
        writer,
        writer_end: None,
        tls: tls.map(Box::new),
    };
    info!(%peer, "connected");
    let last = conn.run(&shutdown).await;
    // The name (if any) is already released: the claim lived inside `run`.
    outbox.close(last.as_ref());
    let (end, unwritten) = match conn.writer_end.take() {
        Some(ended) => ended,
        None => conn.writer.await.unwrap_or((WriteEnd::Aborted, Vec::new())),
    };
    let told = last.as_ref().is_some_and(|m| m.kind == Kind::Reply(Status::ShuttingDown));
    if told && matches!(end, WriteEnd::Finished) {
        shared.told_shutdown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if !unwritten.is_empty() {
        debug!(%peer, count = unwritten.len(), "telling senders of undelivered messages");
        shared.router.report_undelivered(unwritten);
    }
    shared.metrics.connections_open.dec();
    // Dropped for not reading its replies, or for not reading at all: counted once.
    let told_slow = last.as_ref().is_some_and(|m| m.kind == Kind::Reply(Status::SlowConsumer));
    if told_slow || matches!(end, WriteEnd::SlowConsumer) {
        shared.metrics.slow_consumers.inc();
    }
    match end {
        WriteEnd::Finished => debug!(%peer, "connection closed"),
        WriteEnd::SlowConsumer => {
            warn!(%peer, reason = %Status::SlowConsumer, "disconnected: client stopped reading")
        }
        WriteEnd::Aborted => debug!(%peer, "connection dropped at shutdown"),
        WriteEnd::Failed(e) => debug!(%peer, error = %e, "connection lost while writing"),
    }
}

/// A session's counts not yet added to the server's counters; added when flushed or dropped.
struct Tally<'a> {
    metrics: &'a Metrics,
    routed: u64,
    bytes: u64,
}

impl Tally<'_> {
    fn flush(&mut self) {
        if self.routed > 0 {
            self.metrics.routed.inc_by(std::mem::take(&mut self.routed));
        }
        if self.bytes > 0 {
            self.metrics.bytes_in.inc_by(std::mem::take(&mut self.bytes));
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Bounds what the kernel holds unsent for this client (see `Config::kernel_unsent`).
fn bound_kernel_unsent(stream: &TcpStream, bytes: usize, peer: SocketAddr) {
    if bytes == 0 {
        return;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let lowat = u32::try_from(bytes).unwrap_or(u32::MAX);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(lowat) {
            debug!(%peer, error = %e, "could not bound the kernel's unsent bytes");
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, peer);
}

struct Connection<S> {
    frames: FrameReader<S>,
    outbox: Outbox,
    peer: SocketAddr,
    shared: Arc<Shared>,
    writer: JoinHandle<Written>,
    /// Set once the writer task has finished (and been awaited).
    writer_end: Option<Written>,
    /// The TLS session's exporter value, if over TLS (boxed: most connections are plain, and
    /// every idle one carries this struct).
    tls: Option<Box<[u8; TLS_BINDING_LEN]>>,
}

/// How the writer ended, and the messages it could not write.
type Written = (WriteEnd, Vec<Unwritten>);

/// A session ends with an optional last message for the client (already marked closing).
type Farewell = Option<Message>;

/// A token bucket for user listings: `list_burst` at once, then one per `list_interval`.
struct Bucket {
    tokens: u32,
    /// When the last token was added (or the bucket last found full).
    since: Instant,
}

impl Bucket {
    fn full(config: &Config) -> Bucket {
        Bucket { tokens: config.list_burst, since: Instant::now() }
    }

    /// Takes a token if there is one, adding those earned since the last take first.
    fn take(&mut self, config: &Config) -> bool {
        let now = Instant::now();
        let interval = config.list_interval.max(std::time::Duration::from_micros(1));
        let earned = now.saturating_duration_since(self.since).as_nanos() / interval.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(config.list_burst);
            self.since =
                if self.tokens == config.list_burst { now } else { self.since + interval * earned };
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Most of one connection's messages that may wait for the store's answer at once.
const MAX_STORING: usize = 4096;

/// Work a message leaves for the session that may wait (see `Connection::chat`).
type Slow<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), Farewell>> + Send + 'a>>;

fn closing(id: u64, status: Status, to: impl Into<String>, detail: impl Into<String>) -> Farewell {
    Some(Message::reply(id, status, to, detail).closing())
}

fn shutting_down() -> Farewell {
    closing(0, Status::ShuttingDown, "", "the server is shutting down")
}

impl<S: Source> Connection<S> {
    fn config(&self) -> &Config {
        &self.shared.config
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Farewell {
        // Both boxed: registration's state is large and needed once, and the claim is held for
        // the whole session; inline, they would grow every connection's task, idle or not.
        let claim = match Box::pin(self.register(shutdown)).await {
            Ok(claim) => {
                self.shared.metrics.registration(Status::Registered);
                Box::new(claim)
            }
            Err(farewell) => {
                // A client that left before registering is no registration.
                if let Some(Message { kind: Kind::Reply(status), .. }) = &farewell {
                    self.shared.metrics.registration(*status);
                }
                return farewell;
            }
        };
        let farewell = self.chat(&claim, shutdown).await;
        // The name is free in memory at once; the store learns when its owner was last seen.
        self.shared.router.release(*claim).await;
        farewell
    }

    /// Queues a message for this client. The session loop awaits this (and the other replies)
    /// boxed: a reply's state is large and, inline, would grow every connection's task, idle
    /// or not, for a path taken once per reply at most. If its outbox is full, waits for room
    /// while the client reads (the server reads nothing more from it meanwhile, so a client that
    /// pipelines requests is slowed to the pace it takes replies, never dropped for them). A
    /// client that reads nothing for the write timeout is a slow consumer: the session ends.
    async fn reply(&self, msg: Message) -> Result<(), Farewell> {
        let msg = msg.as_ref();
        let pushed = match self.outbox.push(&msg) {
            Err(PushError::Full | PushError::Stalled) => {
                self.outbox.wait_for_own_room(&msg, self.config().write_timeout).await
            }
            pushed => pushed,
        };
        match pushed {
            Ok(()) => Ok(()),
            Err(PushError::Full | PushError::Stalled) => {
                warn!(peer = %self.peer, "disconnecting: client does not read its replies");
                Err(closing(0, Status::SlowConsumer, "", "you are not reading your replies"))
            }
            Err(PushError::Closed) => Err(None),
        }
    }

    fn protocol_error(&self, e: ProtoError) -> Farewell {
        match e.status() {
            Some(status) => {
                warn!(peer = %self.peer, error = %e, "protocol error; closing");
                closing(0, status, "", e.to_string())
            }
            None => {
                debug!(peer = %self.peer, error = %e, "connection lost");
                None
            }
        }
    }

    /// Records that the writer ended on its own (the client stopped reading or vanished):
    /// nothing more can be sent, so the session ends with no farewell.
    fn writer_finished(&mut self, end: Result<Written, tokio::task::JoinError>) -> Farewell {
        self.writer_end = Some(end.unwrap_or((WriteEnd::Aborted, Vec::new())));
        None
    }

    /// Registration phase, within the registration timeout: an optional hello (version 2),
    /// answered with the greeting and its nonce, then the registration. Pings are answered
    /// and `exit` closes the connection silently; anything else is refused and closes it.
    async fn register(&mut self, shutdown: &CancellationToken) -> Result<Claim, Farewell> {
        let deadline = Instant::now() + self.config().register_timeout;
        let timed_out = |peer: SocketAddr| {
            info!(%peer, "registration timed out");
            closing(0, Status::RegistrationTimeout, "", "register within the first few seconds")
        };
        let mut nonce: Option<[u8; NONCE_LEN]> = None;
        loop {
            let frame = tokio::select! {
                () = shutdown.cancelled() => return Err(shutting_down()),
                end = &mut self.writer, if self.writer_end.is_none() => {
                    return Err(self.writer_finished(end));
                }
                frame = timeout_at(deadline, self.frames.next()) => match frame {
                    Ok(frame) => frame,
                    Err(_) => return Err(timed_out(self.peer)),
                },
            };
            let msg = match frame {
                None => {
                    debug!(peer = %self.peer, "closed before registering");
                    return Err(None);
                }
                Some(Err(e)) => return Err(self.protocol_error(e)),
                Some(Ok(msg)) => msg,
            };
            match Request::parse(msg.as_ref()) {
                Ok(Request::Hello { id, .. }) => {
                    if nonce.is_some() {
                        return Err(closing(id, Status::InvalidRequest, "", "hello twice"));
                    }
                    let fresh = fresh_nonce().map_err(|e| {
                        tracing::error!(error = %e, "the OS gave no randomness for a nonce");
                        closing(id, Status::Unavailable, "", "the server cannot make a nonce")
                    })?;
                    nonce = Some(fresh);
                    // From here on this client reads the version 2 layout.
                    self.outbox.set_session(relay_proto::PROTOCOL_VERSION, 1);
                    let greeting = self.greeting(fresh, deadline);
                    Box::pin(self.reply(Message::greeting(id, &greeting))).await?;
                }
                Ok(Request::Register { id, name, version, credentials }) => {
                    let request = self.claim_request(id, name, version, credentials, nonce)?;
                    let claiming = self.shared.router.clone().claim(request);
                    let claimed = tokio::select! {
                        () = shutdown.cancelled() => return Err(shutting_down()),
                        claimed = timeout_at(deadline, claiming) => {
                            claimed.map_err(|_| timed_out(self.peer))?
                        }
                    };
                    let claim = claimed.map_err(|refused| self.refusal(id, name, refused))?;
                    let detail = match claim.key() {
                        Some(_) if claim.first() => {
                            format!("welcome; {name} is now bound to your key")
                        }
                        Some(key) => format!("welcome back; key {}", key.fingerprint()),
                        None => {
                            "welcome (as a guest: the name is yours while you are online)".into()
                        }
                    };
                    let welcome = Message::reply(id, Status::Registered, &**claim.name(), detail);
                    Box::pin(self.reply(welcome)).await?;
                    // Only now may messages be routed here: none can overtake the welcome.
                    if !self.shared.router.open(&claim) {
                        // Displaced while registering; the outbox holds the reason.
                        return Err(None);
                    }
                    let max = self.config().max_frame_len;
                    self.frames.set_max_frame_len(max);
                    // Most clients now wait quietly; their connection holds no read buffer,
                    // and no write buffer once the welcome is written.
                    self.frames.release_if_empty();
                    self.outbox.release_when_written();
                    match claim.key() {
                        Some(key) if claim.first() => {
                            info!(peer = %self.peer, name = %claim.name(),
                            key = %key.fingerprint(), "registered; name bound to a new key")
                        }
                        Some(key) => info!(peer = %self.peer, name = %claim.name(),
                            key = %key.fingerprint(), "registered with key"),
                        None => {
                            info!(peer = %self.peer, name = %claim.name(), "registered as guest")
                        }
                    }
                    return Ok(claim);
                }
                Ok(Request::Ping { id }) => Box::pin(self.reply(Message::pong(id))).await?,
                Ok(Request::Pong { .. }) => {}
                Ok(Request::Offline { .. }) => return Err(None),
                Ok(other) => {
                    info!(peer = %self.peer, "message before registering; closing");
                    return Err(closing(
                        other.id(),
                        Status::InvalidRequest,
                        "",
                        "register before sending anything else",
                    ));
                }
                Err(rejection) => {
                    info!(peer = %self.peer, status = %rejection.status, detail = %rejection.detail,
                        "registration refused");
                    return Err(Some(rejection.to_message().closing()));
                }
            }
        }
    }

    fn greeting(&self, nonce: [u8; NONCE_LEN], deadline: Instant) -> Greeting {
        let config = self.config();
        Greeting::new(
            config.auth,
            nonce,
            config.max_frame_len,
            config.pre_register_limit(),
            deadline.saturating_duration_since(Instant::now()),
            config.ping_interval,
            config.idle_timeout,
        )
    }

    /// Checks a registration's name and credentials.
    fn claim_request<'a>(
        &self,
        id: u64,
        name: &'a str,
        version: u16,
        credentials: Option<&[u8]>,
        nonce: Option<[u8; NONCE_LEN]>,
    ) -> Result<ClaimRequest<'a>, Farewell> {
        let key = name_key(name).map_err(|e| {
            info!(peer = %self.peer, %name, error = %e, "invalid name");
            closing(id, Status::InvalidName, name, e.to_string())
        })?;
        let proof = match (credentials, nonce) {
            (None, _) => None,
            (Some(_), None) => {
                info!(peer = %self.peer, %name, "credentials without a hello");
                return Err(closing(
                    id,
                    Status::AuthFailed,
                    name,
                    "send hello first: the signature covers the greeting's nonce",
                ));
            }
            (Some(credentials), Some(nonce)) => {
                match verify_credentials_bound(&nonce, name, credentials, self.tls.as_deref()) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        warn!(peer = %self.peer, %name, error = %e, "authentication failed");
                        return Err(closing(id, Status::AuthFailed, name, e.to_string()));
                    }
                }
            }
        };
        // Without a name table there are no keys: a keyed client is served as a guest.
        let proof = proof.filter(|_| self.config().auth != AuthMode::None);
        Ok(ClaimRequest { name, key, proof, addr: self.peer, outbox: self.outbox.clone(), version })
    }

    /// The closing reply for a refused claim.
    fn refusal(&self, id: u64, name: &str, refused: Refused) -> Farewell {
        let (status, detail) = match refused {
            Refused::Taken => (Status::NameTaken, format!("the name {name} is taken")),
            Refused::Owned(owner) => (
                Status::NameOwned,
                format!(
                    "the name {owner} belongs to a key; log in with that key, or ask the \
                     operator to release it"
                ),
            ),
            Refused::LooksLike(other) => (
                Status::NameConfusable,
                format!("the name {name} looks like {other}, which is taken; choose another"),
            ),
            Refused::AuthRequired => {
                (Status::AuthRequired, "this server only accepts registrations with a key".into())
            }
            Refused::Unavailable(e) => {
                tracing::error!(peer = %self.peer, %name, error = %e, "name table failed");
                (Status::Unavailable, "the server cannot check names now; try again later".into())
            }
        };
        info!(peer = %self.peer, %name, %status, "registration refused");
        closing(id, status, name, detail)
    }

    /// Registered phase: act on each message until the client leaves or something ends the
    /// session. Pings the client when it has been quiet or written to (see [`Keepalive`]), and
    /// drops it when it stays silent or does not read.
    async fn chat(&mut self, claim: &Claim, shutdown: &CancellationToken) -> Farewell {
        let name = claim.name().clone();
        let frame_timeout = self.config().frame_timeout;
        let mut keepalive = Keepalive::new(Instant::now());
        // Only whole frames are signs of life: a read counts (as of when it was made) once a
        // whole frame came out of it, so a client trickling bytes is not kept alive by them.
        let mut read_at = keepalive.last_heard();
        let mut fresh = false;
        // When the frame now partly buffered was first seen unfinished.
        let mut partial_since: Option<Instant> = None;
        let mut routes = RouteCache::default();
        let mut listings = Bucket::full(self.config());
        // Messages routed and bytes received, counted here and added to the server's
        // counters once per read (and when the session ends), not per message.
        let shared = self.shared.clone();
        let mut tally = Tally { metrics: &shared.metrics, routed: 0, bytes: 0 };
        // The time stamped on messages: read once per socket read, not per message.
        let mut now = now_ms();
        // The timer is re-armed only when it fires, not on every message: a read costs just
        // the `last_heard` update.
        let timer = tokio::time::sleep_until(read_at + self.config().ping_interval);
        tokio::pin!(timer);
        loop {
            // The work a message leaves that may wait (a reply, a busy receiver) is set up
            // while the frame is in hand and awaited once it is gone: boxed, and without the
            // frame, its decoded view or the request alive across the wait, so none of them
            // is part of every connection's task, idle or not.
            let waiting: Slow<'_> = {
                // Every complete frame already read is handled before going back to the select
                // below, so a busy connection pays for the select once per read, not per frame.
                let frame = match self.frames.buffered_body() {
                    Ok(Some(frame)) => {
                        if fresh {
                            fresh = false;
                            keepalive.heard(read_at);
                        }
                        partial_since = None;
                        frame
                    }
                    Err(e) => return self.protocol_error(e),
                    Ok(None) => {
                        tally.flush();
                        if !self.frames.has_partial_frame() {
                            partial_since = None;
                        } else if partial_since.is_none() {
                            // A frame has started: it must finish in time. The timer is
                            // brought forward only if it would fire later than that.
                            partial_since = Some(read_at);
                            let due = read_at + frame_timeout;
                            if due < timer.deadline() {
                                timer.as_mut().reset(due);
                            }
                        }
                        // Biased: what the client sent is read before the timer judges its
                        // silence (after a long wait for a busy receiver, say, its answer to a
                        // ping may be waiting in the socket).
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return shutting_down(),
                            end = &mut self.writer, if self.writer_end.is_none() => {
                                return self.writer_finished(end);
                            }
                            filled = self.frames.fill() => match filled {
                                Ok(true) => {
                                    read_at = Instant::now();
                                    now = now_ms();
                                    fresh = true;
                                }
                                Ok(false) => {
                                    info!(peer = %self.peer, %name, "disconnected");
                                    return None;
                                }
                                Err(e) => return self.protocol_error(e),
                            },
                            () = &mut timer => {
                                if let Some(since) = partial_since
                                    && since.elapsed() >= frame_timeout
                                {
                                    info!(peer = %self.peer, %name,
                                        "a frame was not finished in time; disconnecting");
                                    return closing(0, Status::FrameTimeout, "",
                                        "a frame you started was not finished in time");
                                }
                                // Quiet for a while: give back the buffers.
                                self.frames.release_if_empty();
                                self.outbox.release_if_idle();
                                // Read from the config here, not kept in every connection's
                                // task.
                                let config = self.config();
                                let timing = Timing {
                                    ping_interval: config.ping_interval,
                                    idle_timeout: config.idle_timeout,
                                };
                                let mut due = loop {
                                    let now = Instant::now();
                                    match keepalive.tick(timing, now, self.outbox.written_bytes()) {
                                        Verdict::Wait(due) => break due,
                                        Verdict::Ping(id) => {
                                            trace!(peer = %self.peer, %name, "ping");
                                            // Never waits: a full outbox means the client is
                                            // being sent plenty, and whether it reads is the
                                            // writer's timeout to judge until there is room.
                                            let ping = Message::ping(id);
                                            let end = match self.outbox.push_at(&ping.as_ref()) {
                                                Ok(end) => Some(end),
                                                Err(PushError::Closed) => return None,
                                                Err(_) => None,
                                            };
                                            keepalive.pinged(end, now);
                                        }
                                        Verdict::Idle => {
                                            info!(peer = %self.peer, %name,
                                                "no answer to ping; disconnecting");
                                            return closing(0, Status::IdleTimeout, "",
                                                "no answer to ping");
                                        }
                                        Verdict::NotReading => {
                                            warn!(peer = %self.peer, %name,
                                                "no answer to a ping sent after what it was sent; disconnecting: not reading");
                                            return closing(0, Status::SlowConsumer, "",
                                                "you are not reading what you are sent");
                                        }
                                    }
                                };
                                if let Some(since) = partial_since {
                                    due = due.min(since + frame_timeout);
                                }
                                timer.as_mut().reset(due);
                            }
                        }
                        continue;
                    }
                };
                tally.bytes += frame.len() as u64 + 4;
                // Decoded in place: routing copies the message straight into the receiver's
                // outbox, with no owned message in between.
                let msg = match decode_ref(frame) {
                    Ok(msg) => msg,
                    Err(e) => return self.protocol_error(e),
                };
                // A chat message to the destination of the one before it skips the name rules:
                // that destination passed them (checking costs about a tenth of the server's
                // time per message on a busy connection).
                let request = if msg.kind == Kind::Chat
                    && !msg.register
                    && !msg.exit
                    && routes.is_last_destination(msg.to)
                {
                    Ok(Request::Send { id: msg.id, to: msg.to, content: msg.content })
                } else {
                    Request::parse(msg)
                };
                match request {
                    Ok(Request::Send { id, to, content }) => {
                        trace!(from = %name, %to, id, len = content.len(), "message");
                        let routed =
                            self.shared.router.route(claim, id, to, content, now, &mut routes);
                        // Delivered live; one that waits for a busy receiver counts once it
                        // is queued, one handed to the store once it is stored.
                        if matches!(routed, Ok(Routed::Queued)) {
                            tally.routed += 1;
                        }
                        match routed {
                            Ok(Routed::Queued) => {
                                // The frames after it in this read that go to the same
                                // receiver are queued at once, under one lock.
                                if let Some((outbox, to)) = routes.run_target() {
                                    let mut run = Run {
                                        frames: &mut self.frames,
                                        to,
                                        from: claim.name(),
                                        time: now,
                                        max_frame_len: self.shared.config.max_frame_len,
                                        left: MAX_RUN,
                                        bytes: 0,
                                        peeked: 0,
                                    };
                                    let origin = Some(claim.origin());
                                    let queued = outbox.push_run(claim.token(), origin, &mut run);
                                    tally.routed += queued as u64;
                                    tally.bytes += run.bytes;
                                }
                                continue;
                            }
                            Ok(Routed::Stored) => {
                                // The store answers each stored message; a sender may have
                                // only so many waiting, so storing is paced by the disk.
                                if self.outbox.stored_backlog() < MAX_STORING {
                                    continue;
                                }
                                Box::pin(async {
                                    tokio::select! {
                                        () = self.outbox.wait_for_store(MAX_STORING / 2) => Ok(()),
                                        () = shutdown.cancelled() => Err(shutting_down()),
                                    }
                                })
                            }
                            Ok(Routed::Full(pending)) => {
                                Box::pin(self.wait_for_receiver(pending, shutdown, &name, id))
                            }
                            Err((why, to)) => Box::pin(self.undelivered(&name, id, why, to)),
                        }
                    }
                    Ok(Request::ListUsers { id, after }) => {
                        // A listing costs the server far more than the request costs the
                        // client: a token bucket per connection. (`after` is owned first: it
                        // is borrowed from the frame, which is lent by the reader.)
                        let after = after.to_string();
                        let allowed = listings.take(self.config());
                        if !allowed {
                            debug!(peer = %self.peer, %name, "user listing rate-limited");
                        }
                        let this = &*self;
                        Box::pin(async move {
                            // Answered only once every earlier message of this connection
                            // has its answer from the store: a client (a script at the end of
                            // its input) can use a listing to know nothing more is coming.
                            this.outbox.wait_for_store(1).await;
                            if allowed {
                                this.list_users(id, after).await
                            } else {
                                let detail = "too many user listings; try again in a moment";
                                this.reply(Message::reply(id, Status::RateLimited, "", detail))
                                    .await
                            }
                        })
                    }
                    Ok(Request::Ping { id }) => Box::pin(self.reply(Message::pong(id))),
                    Ok(Request::Pong { id }) => {
                        keepalive.pong(id);
                        continue;
                    }
                    Ok(Request::Ack { seq, .. }) => {
                        self.shared.router.acked(claim, seq);
                        continue;
                    }
                    Ok(Request::Offline { .. }) => {
                        info!(peer = %self.peer, %name, "offline");
                        return None;
                    }
                    Ok(Request::Register { id, .. }) => {
                        let detail = format!("already registered as {name}");
                        Box::pin(self.reply(Message::reply(id, Status::InvalidRequest, "", detail)))
                    }
                    Ok(Request::Hello { id, .. }) => {
                        let detail = "hello comes before registering";
                        Box::pin(self.reply(Message::reply(id, Status::InvalidRequest, "", detail)))
                    }
                    Err(rejection) => {
                        debug!(peer = %self.peer, %name, status = %rejection.status,
                        detail = %rejection.detail, "request refused");
                        Box::pin(self.reply(rejection.to_message()))
                    }
                }
            };
            if let Err(farewell) = waiting.await {
                return farewell;
            }
        }
    }

    /// Waits for room at a busy receiver, but not through a shutdown; tells the client if the
    /// message could not be delivered.
    async fn wait_for_receiver(
        &self,
        pending: Pending,
        shutdown: &CancellationToken,
        name: &str,
        id: u64,
    ) -> Result<(), Farewell> {
        let waited = tokio::select! {
            waited = pending => waited,
            () = shutdown.cancelled() => return Err(shutting_down()),
        };
        match waited {
            Ok(()) => {
                self.shared.metrics.routed.inc();
                Ok(())
            }
            Err((why, to)) => self.undelivered(name, id, why, to).await,
        }
    }

    /// Tells the client its message `id` to `to` was not delivered, and why.
    async fn undelivered(
        &self,
        name: &str,
        id: u64,
        why: Undelivered,
        to: String,
    ) -> Result<(), Farewell> {
        let metrics = &self.shared.metrics;
        let reply = match why {
            Undelivered::NotOnline => {
                metrics.refused(Status::NotFound);
                debug!(from = %name, %to, id, "destination not found");
                let detail = format!("{to} is not online");
                Message::reply(id, Status::NotFound, to, detail)
            }
            Undelivered::ReceiverFull => {
                metrics.refused(Status::NotDelivered);
                debug!(from = %name, %to, id, "receiver not keeping up; message refused");
                let detail = format!("{to} is not keeping up; the message was not delivered");
                Message::reply(id, Status::NotDelivered, to, detail)
            }
            Undelivered::Unreachable => {
                metrics.refused(Status::NotDelivered);
                debug!(from = %name, %to, id, "receiver on another node, cluster link down");
                let detail = format!(
                    "{to} is on another node and the cluster link is down; the message was not delivered"
                );
                Message::reply(id, Status::NotDelivered, to, detail)
            }
            Undelivered::TooLarge => {
                metrics.refused(Status::FrameTooLarge);
                Message::reply(
                    id,
                    Status::FrameTooLarge,
                    to,
                    "the message is over the frame limit once the sender's name is added",
                )
            }
        };
        self.reply(reply).await
    }

    /// One page of the users online, those after `after` (sorted by name).
    async fn list_users(&self, id: u64, after: String) -> Result<(), Farewell> {
        let users = self.shared.router.users();
        let page = self.config().list_page;
        let start = users.partition_point(|(name, _)| **name <= *after);
        let shown = &users[start..users.len().min(start + page)];
        let next = (start + page < users.len()).then(|| shown.last().map(|(n, _)| n.clone()));
        let parts = Message::user_list(
            id,
            shown.iter().map(|(name, addr)| (&**name, addr.to_string())),
            self.config().max_frame_len,
            next.flatten().as_deref(),
        );
        for part in parts {
            self.reply(part).await?;
        }
        Ok(())
    }
}
