//! Errors from reading and writing frames.

use crate::message::Status;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame's length prefix (or an outgoing message) is over the frame limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The length the frame claims, or the outgoing message's encoded length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A frame's body is not exactly one valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame received.
        buffered: usize,
    },
    /// A message could not be serialized.
    #[error("could not encode message: {0}")]
    Encode(String),
    /// The underlying socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProtoError {
    /// The typed status to send the peer before closing, for errors the peer caused.
    pub fn status(&self) -> Option<Status> {
        match self {
            ProtoError::FrameTooLarge { .. } => Some(Status::FrameTooLarge),
            ProtoError::Malformed(_) => Some(Status::Malformed),
            ProtoError::Truncated { .. } | ProtoError::Encode(_) | ProtoError::Io(_) => None,
        }
    }
}
