//! Rules for user names and for the destinations a message may be addressed to.

use std::net::SocketAddr;

use crate::limits::MAX_NAME_LEN;

/// Why a name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// The name has a whitespace or control character.
    #[error("name contains whitespace or control characters")]
    BadCharacter,
    /// The name reads as an `ip:port` address, which would make addressing ambiguous.
    #[error("name looks like an ip:port address")]
    LooksLikeAddress,
}

/// Checks that `name` may be registered: 1 to 64 bytes, no whitespace or control characters,
/// and not an `ip:port` address (messages may be addressed by either, so they must not clash).
///
/// # Errors
/// The first rule the name breaks.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    // Checked on every message's destination, so the common all-ASCII case is one byte scan:
    // in ASCII, whitespace and control characters are exactly the bytes up to space and DEL,
    // and only a name with a colon can read as an `ip:port`.
    let mut colon = false;
    for &b in name.as_bytes() {
        if !b.is_ascii() {
            return validate_unicode(name);
        }
        if b <= b' ' || b == 0x7f {
            return Err(NameError::BadCharacter);
        }
        colon |= b == b':';
    }
    if colon && name.parse::<SocketAddr>().is_ok() {
        return Err(NameError::LooksLikeAddress);
    }
    Ok(())
}

/// The character rule for names with non-ASCII characters.
fn validate_unicode(name: &str) -> Result<(), NameError> {
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::BadCharacter);
    }
    if looks_like_addr(name) && name.parse::<SocketAddr>().is_ok() {
        return Err(NameError::LooksLikeAddress);
    }
    Ok(())
}

/// Every `ip:port` has a colon before the port; a name without one needs no parse attempt.
fn looks_like_addr(s: &str) -> bool {
    s.contains(':')
}

/// Where a message is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A registered user name.
    Name(&'a str),
    /// A connected client's address as the server sees it.
    Addr(SocketAddr),
}

/// Reads a message's `to` field: an `ip:port` address if it parses as one, otherwise a name,
/// which must itself be valid.
///
/// # Errors
/// The rule a destination that is not an address breaks as a name.
pub fn parse_destination(to: &str) -> Result<Destination<'_>, NameError> {
    if looks_like_addr(to)
        && let Ok(addr) = to.parse::<SocketAddr>()
    {
        return Ok(Destination::Addr(addr));
    }
    validate_name(to).map(|()| Destination::Name(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("alice"), Ok(()));
        assert_eq!(validate_name("Zoë_42-x.y"), Ok(()));
        assert_eq!(validate_name(&"a".repeat(64)), Ok(()));
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"a".repeat(65)), Err(NameError::TooLong));
        // 64 bytes, not characters: 33 two-byte characters are 66 bytes.
        assert_eq!(validate_name(&"é".repeat(33)), Err(NameError::TooLong));
        for bad in [
            "a b",
            "a\tb",
            "a\nb",
            "a\rb",
            "a\u{b}b",
            "a\u{c}b",
            "a\u{7f}b",
            "a\u{7}b",
            "\u{a0}x",
            "x\u{2028}",
            "é\u{85}",
        ] {
            assert_eq!(validate_name(bad), Err(NameError::BadCharacter), "{bad:?}");
        }
        assert_eq!(validate_name("127.0.0.1:80"), Err(NameError::LooksLikeAddress));
        assert_eq!(validate_name("[::1]:80"), Err(NameError::LooksLikeAddress));
        assert_eq!(validate_name("host:80"), Ok(()));
    }

    #[test]
    fn ascii_fast_path_matches_the_character_rule() {
        for b in 0u8..128 {
            let c = char::from(b);
            let name = format!("a{c}b");
            let refused = validate_name(&name) == Err(NameError::BadCharacter);
            assert_eq!(refused, c.is_whitespace() || c.is_control(), "byte {b}");
        }
    }

    #[test]
    fn destinations() {
        assert_eq!(parse_destination("bob"), Ok(Destination::Name("bob")));
        assert_eq!(
            parse_destination("127.0.0.1:5000"),
            Ok(Destination::Addr("127.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(
            parse_destination("[::1]:5000"),
            Ok(Destination::Addr("[::1]:5000".parse().unwrap()))
        );
        assert_eq!(parse_destination(""), Err(NameError::Empty));
        assert_eq!(parse_destination("two words"), Err(NameError::BadCharacter));
    }
}
