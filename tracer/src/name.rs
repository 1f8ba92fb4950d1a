//! Names that come from traced processes (paths, `comm`, `exe`, exec file names) are bytes,
//! not text: a process can call itself `"\xff\xfe"` and map a file whose name holds an escape
//! sequence. vmatrace carries each such name as one reversible text form, made where the bytes
//! enter (the kernel's records, `/proc`) and undone where a name is used as a path again, so
//! that nothing fails on a name and JSON (which needs text) holds it exactly:
//!
//! - valid UTF-8 stays as it is, except `\`, which becomes `\\`;
//! - every byte that is not part of valid UTF-8 becomes `\xHH` (two lower-case hex digits).
//!
//! [`to_bytes`] gives the original bytes back. Human output goes one step further with
//! [`Shown`], which also escapes every character a terminal would act on.

use std::{
    ffi::{OsStr, OsString},
    fmt::{self, Write as _},
    os::unix::ffi::{OsStrExt, OsStringExt},
};

/// The text form of the name `bytes` (see the module documentation).
pub fn from_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The text form of an OS string (a path read from `/proc`, a link target).
pub fn from_os(s: &OsStr) -> String {
    from_bytes(s.as_bytes())
}

/// The bytes a text form stands for. Total: a backslash that starts no escape (a recording
/// written by hand) stands for itself.
pub fn to_bytes(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            match b.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                    continue;
                }
                Some(b'x') => {
                    let hex = b
                        .get(i + 2..i + 4)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The path a text form stands for.
pub fn to_os(text: &str) -> OsString {
    OsString::from_vec(to_bytes(text))
}

/// A name made safe for a terminal or a log: every control character (C0 such as ESC, BEL,
/// CR and LF; DEL; the C1 range, which some terminals read as ESC sequences) and the
/// bidirectional overrides that reorder what is shown are escaped, so that a name is always
/// one visible run of text on one line.
pub struct Shown<'a>(pub &'a str);

/// Wraps `name` for human output.
pub fn shown(name: &str) -> Shown<'_> {
    Shown(name)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(needs_escape) {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or(' ');
            if (c as u32) < 0x80 {
                // The same form as an invalid byte: what the process's bytes were.
                write!(f, "\\x{:02x}", c as u32)?;
            } else {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_string_survives_the_round_trip() {
        let cases: [&[u8]; 7] = [
            b"/usr/lib/libc.so.6",
            b"\xff\xfe\x80name",
            b"a\\b\\xff\\\\",
            b"\\x4",
            "caf\u{e9} \u{1f600}".as_bytes(),
            b"\x1b]0;PWNED\x07\x1b[2J\nFAKE LINE",
            b"",
        ];
        for bytes in cases {
            let text = from_bytes(bytes);
            assert_eq!(to_bytes(&text), bytes, "{text}");
            // And through JSON, as a recording carries it.
            let json = serde_json::to_string(&text).expect("serializes");
            let back: String = serde_json::from_str(&json).expect("parses");
            assert_eq!(to_bytes(&back), bytes);
        }
        assert_eq!(from_bytes(b"\xff\xfeab"), "\\xff\\xfeab");
        assert_eq!(from_bytes(b"a\\b"), "a\\\\b");
        // All 256 single bytes and every pair of them.
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(to_bytes(&from_bytes(&[a, b])), [a, b]);
            }
        }
    }

    #[test]
    fn a_name_is_shown_as_one_line_with_no_terminal_control() {
        let hostile = from_bytes(b"/tmp/\x1b]0;PWNED\x07\x1b[2J\nFAKE LINE\r\xff\x7f");
        let shown = shown(&hostile).to_string();
        assert_eq!(
            shown,
            "/tmp/\\x1b]0;PWNED\\x07\\x1b[2J\\x0aFAKE LINE\\x0d\\xff\\x7f"
        );
        assert!(shown.chars().all(|c| !c.is_control()));
        // C1 controls (U+009B is CSI) and a right-to-left override.
        assert_eq!(
            Shown("a\u{9b}2Jb\u{202e}c").to_string(),
            "a\\u{9b}2Jb\\u{202e}c"
        );
        assert_eq!(Shown("caf\u{e9}").to_string(), "caf\u{e9}");
    }
}
