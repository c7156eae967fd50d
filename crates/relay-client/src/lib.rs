//! Client library for the relay chat server, and the interactive `relay-client` built on it.
//!
//! [`Client::connect`] opens a connection and registers a name; the returned [`Client`] sends
//! (it is cheap to clone and share between tasks) and [`Events`] yields what arrives:
//! messages, "not found" replies, user lists, the server's shutdown. Under the hood one task
//! reads the socket and one writes it, batching frames: senders encode straight into the
//! writer's buffer, and the reader hands over every event of one socket read at once. A program
//! that sends bursts can add many messages to a [`Batch`] and hand them over together.
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

pub use client::{Batch, Client, ClientBuilder, ClientConfig};
pub use error::{ConnectError, SendError};
pub use event::Event;
pub use incoming::Events;
pub use keys::{KeyError, create_key, default_key_path, load_key, load_or_create_key};
pub use relay_proto::{Identity, PublicKey, Status, User, name_key as check_name};
