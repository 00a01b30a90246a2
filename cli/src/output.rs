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
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Output { source })
}

/// `print!` that returns [`Error::Output`] instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// `println!` that returns [`Error::Output`] instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
