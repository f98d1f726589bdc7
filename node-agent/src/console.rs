//! Guest console output made safe to print on an administrator's terminal:
//! a guest controls every byte of its serial log, and escape sequences
//! (cursor movement, window titles, OSC 52 clipboard writes, a fake prompt)
//! or bidirectional-text overrides must not reach the terminal as they are.
//! Every control character but newline and tab, and every bidi control, is
//! shown escaped (`\x1b`, `\u{202e}`); bytes that are not UTF-8 become U+FFFD.

/// `bytes` as text a terminal shows literally.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            // C1 controls, and the bidi embeddings, overrides and isolates.
            '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn escapes_reach_the_terminal_only_as_text() {
        assert_eq!(sanitize(b"hello\tworld\n"), "hello\tworld\n");
        assert_eq!(
            sanitize(b"\x1b[2J\x1b]52;c;ZXZpbA==\x07"),
            "\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07"
        );
        assert_eq!(sanitize(b"a\rb\x7f"), "a\\x0db\\x7f");
        assert_eq!(
            sanitize("x\u{202e}gnp.exe\u{9b}".as_bytes()),
            "x\\u{202e}gnp.exe\\u{9b}"
        );
        assert_eq!(sanitize(b"\xff\xfe"), "\u{fffd}\u{fffd}");
        assert_eq!(sanitize("héllo ✓".as_bytes()), "héllo ✓");
    }
}
