//! Helpers shared by the server's integration tests: an in-process server on port 0, a raw
//! protocol peer for sending what a well-behaved client never would, and waits with timeouts.
// Not every test file uses every helper; helpers fail a test by panicking, as tests do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_client::{Client, ClientConfig, Event, Events};
use relay_proto::{Message, MessageCodec, ServerEvent, Status};
use relay_server::{Config, Server, ServerHandle};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// Generous: these are upper bounds on a loaded 2-core machine, not expectations.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    /// The data directory, unless the test gave its own: removed with the server.
    pub data: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with_config(Config::default()).await
    }

    pub async fn with_config(config: Config) -> TestServer {
        TestServer::bind("127.0.0.1:0", config).await
    }

    /// Binds `addr` and runs a server with `config`. A config left with the default data
    /// directory gets a fresh temporary one instead, so tests never share or leave state.
    pub async fn bind(addr: &str, mut config: Config) -> TestServer {
        let mut data = None;
        if config.data_dir == Config::default().data_dir {
            let dir = tempfile::tempdir().unwrap();
            config.data_dir = dir.path().to_path_buf();
            data = Some(dir);
        }
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = Server::new(listener, config).unwrap();
        let addr = server.local_addr().unwrap();
        let handle = server.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        TestServer { addr, handle, shutdown, task, data }
    }

    pub fn url(&self) -> String {
        self.addr.to_string()
    }

    pub async fn connect(&self, name: &str) -> (Client, Events) {
        within(Client::connect(&self.url(), name)).await.unwrap()
    }

    pub async fn connect_with(&self, name: &str, config: ClientConfig) -> (Client, Events) {
        within(Client::connect_with(&self.url(), name, config)).await.unwrap()
    }

    /// Shuts the server down and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        within(self.task).await.unwrap();
    }

    /// Waits until `name` is no longer registered.
    pub async fn wait_until_gone(&self, name: &str) {
        wait_until(|| !self.handle.users().iter().any(|(n, _)| n == name)).await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.expect("timed out waiting")
}

/// Polls `condition` until it holds, failing the test after [`WAIT`].
pub async fn wait_until(mut condition: impl FnMut() -> bool) {
    within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// The next event, failing the test after [`WAIT`] or if the stream ended.
pub async fn next_event(events: &mut Events) -> Event {
    within(events.next()).await.expect("event stream ended")
}

/// The next chat message's `(from, content)`, skipping nothing: any other event fails.
pub async fn next_message(events: &mut Events) -> (String, String) {
    match next_event(events).await {
        Event::Message { from, content, .. } => {
            (from.to_string(), String::from_utf8(content.to_vec()).unwrap())
        }
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A peer that speaks the protocol by hand.
pub struct RawPeer {
    pub framed: Framed<TcpStream, MessageCodec>,
}

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect(addr).await.unwrap();
        RawPeer {
            framed: Framed::new(stream, MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN)),
        }
    }

    /// Connects with a tiny receive buffer, so a peer that stops reading backs up quickly.
    pub async fn connect_small_buffer(addr: SocketAddr) -> RawPeer {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        RawPeer {
            framed: Framed::new(stream, MessageCodec::new(relay_proto::DEFAULT_MAX_FRAME_LEN)),
        }
    }

    /// Registers an already connected peer as `name`.
    pub async fn register_as(mut self, name: &str) -> RawPeer {
        self.send(Message::register(1, name)).await;
        match self.recv().await {
            Some(ServerEvent::Reply { status: Status::Registered, .. }) => self,
            other => panic!("registration failed: {other:?}"),
        }
    }

    /// Connects and registers as `name`.
    pub async fn register(addr: SocketAddr, name: &str) -> RawPeer {
        let mut peer = RawPeer::connect(addr).await;
        peer.send(Message::register(1, name)).await;
        match peer.recv().await {
            Some(ServerEvent::Reply { status: Status::Registered, .. }) => peer,
            other => panic!("registration failed: {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: Message) {
        within(self.framed.send(msg)).await.unwrap();
    }

    /// Writes raw bytes, bypassing the codec.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        within(self.framed.get_mut().write_all(bytes)).await.unwrap();
    }

    /// The next message from the server, or `None` at end of stream or on a read error.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
        match within(self.framed.next()).await {
            Some(Ok(msg)) => Some(ServerEvent::parse(msg).unwrap()),
            _ => None,
        }
    }

    /// Reads until the server closes the connection; returns the closing reply's status.
    pub async fn closing_status(&mut self) -> Option<Status> {
        let mut status = None;
        while let Some(event) = self.recv().await {
            if let ServerEvent::Reply { status: s, closing: true, .. } = event {
                status = Some(s);
            }
        }
        status
    }
}
