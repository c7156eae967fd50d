//! Protocol constants: version, name length, and the bounds on frame length.

/// Newest version of the protocol this crate speaks. A client states it when it registers;
/// the server refuses versions it does not know with
/// [`Status::UnsupportedVersion`](crate::Status).
pub const PROTOCOL_VERSION: u16 = 2;

/// Oldest version still served: version 1 clients register as guests, unchanged.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Bytes a version 2 message has after `content`: `seq` and `time`, 8 bytes each.
pub const V2_EXTRA_LEN: usize = 16;

/// Longest name a client may register, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 64;

/// Bytes of the big-endian length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// Default largest frame body (the bytes after the length prefix): 64 KiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Largest frame body a connection may send before it has registered: 1 KiB. A registration
/// is at most a few hundred bytes, and a small limit means a socket that only sends a length
/// header cannot make the server reserve a large buffer.
pub const PRE_REGISTER_MAX_FRAME_LEN: usize = 1024;

/// Smallest frame limit that may be configured (256 bytes: any valid registration fits).
pub const MIN_FRAME_LEN_FLOOR: usize = 256;

/// Largest frame limit that may be configured (16 MiB).
pub const MAX_FRAME_LEN_CEILING: usize = 16 * 1024 * 1024;

/// Checks a configured maximum frame length.
///
/// The limit must be a power of two between [`MIN_FRAME_LEN_FLOOR`] and
/// [`MAX_FRAME_LEN_CEILING`]. Powers of two let every decode run with a byte limit that is at
/// most twice the frame's real length and never above the configured maximum (see
/// `encoding.rs`).
///
/// # Errors
/// A message a person can read, naming the accepted range.
pub fn check_max_frame_len(len: usize) -> Result<usize, String> {
    if !len.is_power_of_two() || !(MIN_FRAME_LEN_FLOOR..=MAX_FRAME_LEN_CEILING).contains(&len) {
        return Err(format!(
            "maximum frame length must be a power of two from {MIN_FRAME_LEN_FLOOR} to \
             {MAX_FRAME_LEN_CEILING} bytes, got {len}"
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_limits_must_be_powers_of_two_in_range() {
        assert_eq!(check_max_frame_len(65536), Ok(65536));
        assert_eq!(check_max_frame_len(MIN_FRAME_LEN_FLOOR), Ok(MIN_FRAME_LEN_FLOOR));
        assert_eq!(check_max_frame_len(MAX_FRAME_LEN_CEILING), Ok(MAX_FRAME_LEN_CEILING));
        assert!(check_max_frame_len(100_000).is_err());
        assert!(check_max_frame_len(128).is_err());
        assert!(check_max_frame_len(MAX_FRAME_LEN_CEILING * 2).is_err());
        assert!(check_max_frame_len(0).is_err());
    }
}
