//! Standard output that fails with an error, not a panic: `println!` panics when stdout is a
//! closed pipe (`record | head -1`) or a full disk (`> /dev/full`), after the write it
//! reports has committed.

use std::fmt;
use std::io::Write;

use crate::error::{Error, Result};

/// Writes `args` to standard output and flushes, so that a failure is seen at the line
/// that caused it.
///
/// # Errors
/// [`Error::Output`] with the OS error (`Broken pipe`, `No space left on device`).
pub fn write(args: fmt::Arguments<'_>) -> Result<()> {
    let text = escaped_lines(&args.to_string());
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Output { source })
}

/// `text` with every control character but its line ends escaped (see
/// [`sqlite_persistence::Escaped`]): whatever came from outside (a process's name, a file
/// name, a table's) and was not escaped where it was formatted still cannot reach the
/// terminal as an escape sequence.
pub fn escaped_lines(text: &str) -> String {
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| sqlite_persistence::Escaped::new(line).to_string())
        .collect();
    lines.join("\n")
}

/// `print!` that returns [`Error::Output`] instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// One line of output: `text` with every control character escaped, line breaks included
/// (a name holding one would forge a line of its own), then a line end.
///
/// # Errors
/// As [`write()`].
pub fn write_line(args: fmt::Arguments<'_>) -> Result<()> {
    write(format_args!(
        "{}\n",
        sqlite_persistence::Escaped::new(&args.to_string())
    ))
}

/// `println!` that returns [`Error::Output`] instead of panicking: one line, whatever the
/// values in it hold (see [`write_line()`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
