//! Text from outside the program, as it may be shown: a process's name or command line, a
//! file name, a table or version name read from a database file, a server's message.
//!
//! Any of them can hold terminal escape sequences (a process that names itself
//! `\x1b]0;pwned\x07\x1b[2J` retitles and clears the terminal of whoever reads an error
//! naming it) or Unicode's bidirectional controls (which reorder the text around them). The
//! layer shows every such string through [`Escaped`], in its errors, its `tracing` events and
//! its `Display` impls; the command line does the same with everything it prints.

use std::fmt;
use std::path::Path;

/// Shows a string with its control characters (C0, DEL, C1) and Unicode's bidirectional
/// formatting characters escaped as `\x1b` or `\u{202e}`; everything else, non-ASCII text
/// included, as it is.
///
/// ```
/// use sqlite_persistence::Escaped;
///
/// assert_eq!(Escaped::new("\x1b]0;pwned\x07").to_string(), "\\x1b]0;pwned\\x07");
/// assert_eq!(Escaped::new("café ☕").to_string(), "café ☕");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(Text<'a>);

#[derive(Clone, Copy, Debug)]
enum Text<'a> {
    Str(&'a str),
    Path(&'a Path),
}

impl<'a> Escaped<'a> {
    /// `text`, escaped when shown.
    pub fn new(text: &'a str) -> Self {
        Escaped(Text::Str(text))
    }

    /// A path, escaped when shown (bytes that are not UTF-8 as U+FFFD).
    pub fn path(path: &'a Path) -> Self {
        Escaped(Text::Path(path))
    }
}

/// Whether `c` must not reach a terminal as it is.
fn unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(unsafe_to_show) {
        f.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().expect("found at a char boundary");
        if (c as u32) < 0x80 {
            write!(f, "\\x{:02x}", c as u32)?;
        } else {
            write!(f, "\\u{{{:x}}}", c as u32)?;
        }
        rest = &rest[at + c.len_utf8()..];
    }
    f.write_str(rest)
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Text::Str(text) => write_escaped(f, text),
            Text::Path(path) => write_escaped(f, &path.to_string_lossy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidirectional_marks_are_escaped_and_the_rest_kept() {
        let shown = |s: &str| Escaped::new(s).to_string();
        assert_eq!(
            shown("\x1b]0;pwned\x07\x1b[2J"),
            "\\x1b]0;pwned\\x07\\x1b[2J"
        );
        assert_eq!(shown("a\nb\rc\td\x7f"), "a\\x0ab\\x0dc\\x09d\\x7f");
        assert_eq!(shown("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(shown("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(shown("naïve 数据库 ☕"), "naïve 数据库 ☕");
        assert_eq!(
            Escaped::path(Path::new("/tmp/a\x1b[2Jb.db")).to_string(),
            "/tmp/a\\x1b[2Jb.db"
        );
    }
}
