//! Text for the operator's terminal or page: dead letters carry whatever a hostile or broken
//! producer put in them, so control characters are shown as escapes, never sent to the
//! terminal (the `dlq` CLI) or left to hide and reorder text (the console, which also
//! HTML-escapes).
//!
//! `--json` output does not go through here: serde_json escapes C0 control characters itself
//! and the decoded strings stay exact.

use std::fmt::Write;

/// `text` for one line of output (a table cell, a field): every control character, line
/// break and tab included, and every invisible character that reorders or hides text (bidi
/// overrides and isolates, zero-width characters) is replaced by an escape.
///
/// Guarantees: the result holds no C0 or C1 control character, DEL, or such invisible
/// character, so nothing in it is interpreted by a terminal; text without them is returned
/// unchanged. Escapes: `\n`, `\r`, `\t`, `\x1b` for other ASCII controls, `\u{9b}` for the
/// rest. Backslashes are not escaped (`--json` is the exact form).
pub fn line(text: &str) -> String {
    escape(text, false)
}

/// Like [`line()`], but keeps line breaks (`\n`) and tabs: for a multi-line payload.
pub fn block(text: &str) -> String {
    escape(text, true)
}

fn escape(text: &str, keep_layout: bool) -> String {
    if !text.chars().any(|c| needs_escape(c, keep_layout)) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !needs_escape(c, keep_layout) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    out
}

fn needs_escape(c: char, keep_layout: bool) -> bool {
    if keep_layout && (c == '\n' || c == '\t') {
        return false;
    }
    // `is_control`: C0, DEL and C1. Then the invisible formatting characters that reorder
    // text (bidi marks, embeddings, overrides, isolates) or hide it (zero-width ones), and
    // the Unicode line and paragraph separators.
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_bidi_and_keeps_plain_text() {
        assert_eq!(line("orders.paid.v1"), "orders.paid.v1");
        assert_eq!(
            line("a\x1b[2J\r\n\t\x07\x7f\u{9b}\u{202e}é"),
            r"a\x1b[2J\r\n\t\x07\x7f\u{9b}\u{202e}é"
        );
        assert_eq!(block("one\n\ttwo\r\x1b"), "one\n\ttwo\\r\\x1b");
    }
}
