//! The side-by-side tables `stress` and `soak` print.

use std::collections::{BTreeMap, BTreeSet};

/// A side of a table: one column.
pub trait Column {
    /// The column's heading.
    fn label(&self) -> &str;
    /// Its processes' failures, by cause.
    fn causes(&self) -> &BTreeMap<String, usize>;
    /// The hints they printed with their errors.
    fn hints(&self) -> &BTreeSet<String>;
}

/// Prints one row per `(name, cell)` with one column per report (as wide as its widest
/// cell), then each report's failures by cause and their hints.
///
/// # Errors
/// [`Error::Output`](crate::Error::Output) if standard output cannot be written.
pub fn print<R: Column, F: Fn(&R) -> String>(
    rows: &[(&str, F)],
    reports: &[R],
) -> crate::Result<()> {
    let cells: Vec<Vec<String>> = reports
        .iter()
        .map(|r| rows.iter().map(|(_, cell)| cell(r)).collect())
        .collect();
    let first = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 2;
    let widths: Vec<usize> = reports
        .iter()
        .zip(&cells)
        .map(|(r, c)| {
            c.iter()
                .map(String::len)
                .chain([r.label().len()])
                .max()
                .unwrap_or(0)
                + 4
        })
        .collect();
    crate::out!("{:first$}", "")?;
    for (r, width) in reports.iter().zip(&widths) {
        crate::out!("{:>width$}", r.label())?;
    }
    crate::outln!()?;
    for (i, (name, _)) in rows.iter().enumerate() {
        crate::out!("{name:first$}")?;
        for (c, width) in cells.iter().zip(&widths) {
            crate::out!("{:>width$}", c[i])?;
        }
        crate::outln!()?;
    }
    for r in reports.iter().filter(|r| !r.causes().is_empty()) {
        crate::outln!("{} failures by cause:", r.label())?;
        for (cause, n) in r.causes() {
            crate::outln!("  {n:>4} x {cause}")?;
        }
        for hint in r.hints() {
            crate::outln!("  hint: {hint}")?;
        }
    }
    Ok(())
}
