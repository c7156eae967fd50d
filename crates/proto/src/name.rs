//! Rules for user names and for the destinations a message may be addressed to.
//!
//! [`name_key`] is the one function that decides whether a name may be registered and which
//! names count as the same one. Its rules, in order (documented for implementers in
//! `docs/PROTOCOL.md`, "Names"):
//!
//! 1. 1 to [`MAX_NAME_LEN`] bytes of UTF-8.
//! 2. No `:` (so no name can read as an `ip:port` address), no whitespace, no control
//!    characters, no format characters (bidi controls, zero-width characters, the BOM...),
//!    nothing unassigned, private-use or a surrogate, and no character that is invisible
//!    (default-ignorable, such as the Hangul fillers).
//! 3. The **canonical form** is NFKC, then lower case, then NFKC again: `Alice`, `ALICE` and
//!    fullwidth `ａｌｉｃｅ` all have the canonical form `alice`, and are the same name. The
//!    canonical form must itself pass rules 1 and 2 (fullwidth `：` becomes `:`).
//! 4. The **skeleton** is NFKC, then the Unicode TR39 confusables skeleton, then lower case,
//!    then the skeleton again (ergo's order: the skeleton before the case mapping, so a capital
//!    `I` still looks like an `l`; the second pass because `M` lowered is `m`, which looks like
//!    `rn`). Two names with different canonical forms and the same skeleton (Latin `alice` and
//!    `аlice` with a Cyrillic `а`, `aIice` with a capital `I`, `rn` and `m`) look alike; a
//!    server refuses the second.

use std::borrow::Cow;
use std::net::SocketAddr;

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

use crate::limits::MAX_NAME_LEN;

/// Why a name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name (or its canonical form) is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// The name has a whitespace or control character.
    #[error("name contains whitespace or control characters")]
    BadCharacter,
    /// The name has an invisible or format character (zero-width, bidi control,
    /// default-ignorable), or one that is unassigned or private-use.
    #[error("name contains invisible, format, unassigned or private-use characters")]
    Invisible,
    /// The name has a `:`, which only addresses (`ip:port`) may have.
    #[error("name contains ':' (only ip:port addresses do)")]
    Colon,
    /// The name reads as an `ip:port` address, which would make addressing ambiguous.
    #[error("name looks like an ip:port address")]
    LooksLikeAddress,
}

/// The two forms of a valid name the server compares: see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NameKey {
    /// NFKC, lower case, NFKC: names with the same canonical form are the same name.
    pub canonical: String,
    /// NFKC, the TR39 skeleton, lower case: different names with the same skeleton look
    /// alike.
    pub skeleton: String,
}

/// Checks that `name` may be registered and returns its canonical form and skeleton.
///
/// # Errors
/// The first rule the name (or its canonical form) breaks.
pub fn name_key(name: &str) -> Result<NameKey, NameError> {
    validate_name(name)?;
    let canonical = canonical_name(name);
    if canonical != name {
        // Normalisation can lengthen a name or produce a character the rules forbid.
        validate_name(&canonical)?;
    }
    Ok(NameKey { skeleton: skeleton(name), canonical: canonical.into_owned() })
}

/// The look-alike key of a valid name: NFKC (which folds width), the TR39 skeleton, lower case
/// (ergo's order for IRC nicknames: the skeleton first, so a capital `I` still looks like an
/// `l`), then the skeleton again.
fn skeleton(name: &str) -> String {
    let nfkc: String = name.nfkc().collect();
    let lower = unicode_security::skeleton(&nfkc).collect::<String>().to_lowercase();
    // Lower case can make new look-alikes (`M` becomes `m`, which looks like `rn`): take the
    // skeleton once more so the result is a fixed point.
    unicode_security::skeleton(&lower).collect()
}

/// The canonical form of a name (NFKC, lower case, NFKC), without checking the rules. All
/// ASCII names take a fast path: their canonical form is their ASCII lower case, borrowed
/// when already lower case. Routing uses this to find a destination.
pub fn canonical_name(name: &str) -> Cow<'_, str> {
    if name.is_ascii() {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Cow::Owned(name.to_ascii_lowercase());
        }
        return Cow::Borrowed(name);
    }
    let lower: String = name.nfkc().collect::<String>().to_lowercase();
    Cow::Owned(lower.nfkc().collect())
}

/// Checks the character and length rules for a name (rules 1 and 2 in the module
/// documentation), on the name as written. [`name_key`] applies them to the canonical form as
/// well; a destination is checked with this alone.
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
    // Checked on every message's destination, so the common case is one branch-free scan:
    // printable ASCII without a colon (in ASCII, whitespace and control characters are
    // exactly the bytes up to space and DEL, and only a name with a colon can be an address).
    if name.bytes().all(|b| b > b' ' && b < 0x7f && b != b':') {
        return Ok(());
    }
    if !name.is_ascii() {
        return validate_unicode(name);
    }
    if name.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(NameError::BadCharacter);
    }
    Err(colon_error(name))
}

/// A name with a colon is refused either way; say which, since an address is the likelier
/// mistake.
fn colon_error(name: &str) -> NameError {
    if name.parse::<SocketAddr>().is_ok() { NameError::LooksLikeAddress } else { NameError::Colon }
}

/// The character rule for names with non-ASCII characters.
fn validate_unicode(name: &str) -> Result<(), NameError> {
    for c in name.chars() {
        if c.is_whitespace() || c.is_control() {
            return Err(NameError::BadCharacter);
        }
        if c == ':' {
            return Err(colon_error(name));
        }
        if invisible(c) {
            return Err(NameError::Invisible);
        }
    }
    Ok(())
}

/// Format, unassigned, private-use and surrogate characters, and characters the skeleton
/// drops (default-ignorable code points such as U+3164 HANGUL FILLER, which is a letter but
/// shows nothing).
fn invisible(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::SpaceSeparator
    ) || unicode_security::skeleton(c.encode_utf8(&mut [0; 4])).next().is_none()
}

/// Where a message is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A registered user name.
    Name(&'a str),
    /// A connected client's address as the server sees it.
    Addr(SocketAddr),
}

/// Reads a message's `to` field: an `ip:port` address if it parses as one (Rust's
/// `SocketAddr` grammar: `1.2.3.4:5`, `[::1]:5`, `[fe80::1%2]:5`), otherwise a name, which
/// must itself be valid (so anything else with a `:` is refused).
///
/// # Errors
/// The rule a destination that is not an address breaks as a name.
pub fn parse_destination(to: &str) -> Result<Destination<'_>, NameError> {
    match validate_name(to) {
        Ok(()) => Ok(Destination::Name(to)),
        Err(NameError::LooksLikeAddress) => match to.parse::<SocketAddr>() {
            Ok(addr) => Ok(Destination::Addr(addr)),
            Err(_) => Err(NameError::Colon),
        },
        Err(e) => Err(e),
    }
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
        assert_eq!(validate_name("host:80"), Err(NameError::Colon));
        assert_eq!(validate_name("é:"), Err(NameError::Colon));
    }

    #[test]
    fn invisible_and_format_characters_are_refused() {
        for bad in [
            "alice\u{200b}", // zero-width space
            "al\u{200d}ice", // zero-width joiner
            "\u{202e}ecila", // right-to-left override
            "ali\u{2066}ce", // left-to-right isolate
            "\u{feff}alice", // byte order mark
            "al\u{ad}ice",   // soft hyphen
            "\u{3164}",      // Hangul filler: a letter that shows nothing
            "a\u{e000}",     // private use
            "a\u{378}",      // unassigned
        ] {
            assert_eq!(validate_name(bad), Err(NameError::Invisible), "{bad:?}");
            assert!(name_key(bad).is_err());
        }
    }

    #[test]
    fn case_and_width_variants_share_a_canonical_form() {
        for same in ["alice", "Alice", "ALICE", "ａｌｉｃｅ", "Ａlice"] {
            assert_eq!(name_key(same).unwrap().canonical, "alice", "{same:?}");
        }
        assert_eq!(canonical_name("Bob"), "bob");
        assert!(matches!(canonical_name("bob"), Cow::Borrowed("bob")));
        // A fullwidth colon becomes a colon once normalised.
        assert_eq!(name_key("a\u{ff1a}b"), Err(NameError::Colon));
    }

    #[test]
    fn look_alikes_share_a_skeleton() {
        let alice = name_key("alice").unwrap();
        for look_alike in ["аlice", "Alice", "aIice", "alіce", "ａｌｉｃｅ"] {
            let key = name_key(look_alike).unwrap();
            assert_eq!(key.skeleton, alice.skeleton, "{look_alike:?}");
        }
        assert_eq!(name_key("rnodern").unwrap().skeleton, name_key("modern").unwrap().skeleton);
        assert_ne!(name_key("bob").unwrap().skeleton, alice.skeleton);
        // Cyrillic а is another canonical name: only the skeleton catches it.
        assert_ne!(name_key("аlice").unwrap().canonical, alice.canonical);
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
        // Neither an address nor a name.
        assert_eq!(parse_destination("01.2.3.4:5"), Err(NameError::Colon));
        assert_eq!(parse_destination("[fe80::1%eth0]:5"), Err(NameError::Colon));
        assert_eq!(parse_destination("host:80"), Err(NameError::Colon));
    }
}
