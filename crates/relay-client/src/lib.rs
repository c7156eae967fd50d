//! Client library for the relay chat server (the interactive `relay-client` binary is built on
//! it, and keeps its command line to itself).
//!
//! [`Client::builder`] (or [`Client::connect`], for a guest) opens a connection and registers a
//! name, proving it with an Ed25519 key ([`load_or_create_key`] keeps one in a file) so that
//! the name stays its owner's; the returned [`Client`] sends
//! (it is cheap to clone and share between tasks) and [`Events`] yields what arrives:
//! messages, "not found" replies, user lists, the server's shutdown. Under the hood one task
//! reads the socket and one writes it, batching frames: senders encode straight into the
//! writer's buffer, and the reader hands over every event of one socket read at once. A program
//! that sends bursts can add many messages to a [`Batch`] and hand them over together.
//! [`Events`] is also a `futures::Stream`. Over TLS, set [`ClientBuilder::tls`] with a
//! [`Tls`] that says how to trust the server (the system's roots, a CA file, or a pinned
//! certificate fingerprint).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use relay_client::{Client, Event};
//!
//! let (bob, mut events) = Client::connect("127.0.0.1:8080", "bob").await?;
//! bob.send("alice", "hi alice").await?;
//! if let Some(Event::Message { from, content, .. }) = events.next().await {
//!     println!("{from}: {}", String::from_utf8_lossy(&content));
//! }
//! bob.offline().await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod client;
mod error;
mod event;
mod incoming;
mod keys;
mod outgoing;
mod tls;

pub use client::{Batch, Client, ClientBuilder, ClientConfig};
pub use error::{ConnectError, SendError};
pub use event::Event;
pub use incoming::{Events, MessageRef, Received};
pub use keys::{KeyError, create_key, default_key_path, load_key, load_or_create_key};
pub use relay_proto::{Identity, NameError, PublicKey, Status, User, name_key};
pub use tls::{Tls, TlsError};

/// The library's per-message work without a connection, for its criterion benches (`cargo
/// bench -p relay-client`). Not part of the API: it may change or go at any time.
#[doc(hidden)]
pub mod bench {
    use bytes::BytesMut;

    use crate::{Event, Received};

    /// Turns received frames into what the program gets, exactly as a connection's reader
    /// and [`Events`](crate::Events) do.
    pub struct FrameDecoder(crate::client::FrameDecoder);

    impl FrameDecoder {
        /// A decoder in a fresh session's state.
        #[allow(clippy::new_without_default)]
        pub fn new() -> FrameDecoder {
            FrameDecoder(crate::client::FrameDecoder::new())
        }

        /// Takes every complete frame off the front of `read` (one socket read's bytes) and
        /// hands each event to `f`, as [`Events::next`](crate::Events::next) would.
        pub fn decode(&mut self, read: &mut BytesMut, f: impl FnMut(Event)) {
            self.0.decode(read).drain_events(f);
        }

        /// The same, handing messages in place, as [`Events::drain`](crate::Events::drain)
        /// would.
        pub fn decode_in_place(&mut self, read: &mut BytesMut, f: impl FnMut(Received<'_>)) {
            self.0.decode(read).drain_in_place(f);
        }
    }
}
