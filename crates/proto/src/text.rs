//! Showing untrusted text safely: what a peer sends (names, message content, a server's
//! refusal) is printed to terminals and logs, where control characters could forge lines or
//! drive the terminal (escape sequences, OSC 52 clipboard writes) and format characters could
//! disguise it (a right-to-left override makes `invoice\u{202e}gpj.exe` show as
//! `invoiceexe.jpg`).

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Whether `c` is shown escaped: control characters, format characters (bidi controls,
/// zero-width characters, the BOM) and the line and paragraph separators.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
}

/// `bytes` as text safe for a terminal or a log line: invalid UTF-8 replaced, and every
/// character [`needs_escape`] says so shown as its Rust escape (`\n`, `\u{1b}`, `\u{202e}`).
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(needs_escape) {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(printable(b"hello"), "hello");
        assert_eq!(printable("zoë ✓".as_bytes()), "zoë ✓");
        assert_eq!(printable(b"a\nb"), "a\\nb");
        assert_eq!(printable(b"\x1b[2J"), "\\u{1b}[2J");
        assert_eq!(printable(b"\x1b]52;c;aGk=\x07"), "\\u{1b}]52;c;aGk=\\u{7}");
        assert_eq!(printable(b"\xff ok"), "\u{fffd} ok");
        assert_eq!(printable("invoice\u{202e}gpj.exe".as_bytes()), "invoice\\u{202e}gpj.exe");
        assert_eq!(
            printable("a\u{200b}b\u{2028}c\u{2029}".as_bytes()),
            "a\\u{200b}b\\u{2028}c\\u{2029}"
        );
        assert_eq!(printable("\u{feff}x".as_bytes()), "\\u{feff}x");
    }
}
