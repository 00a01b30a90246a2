//! The side-by-side tables `stress` and `soak` print.

use std::collections::BTreeMap;

/// A side of a table: one column.
pub trait Column {
    /// The column's heading.
    fn label(&self) -> &str;
    /// Its processes' failures, by cause.
    fn causes(&self) -> &BTreeMap<String, usize>;
}

/// Prints one row per `(name, cell)` with one column per report (as wide as its widest
/// cell), then each report's failures by cause.
pub fn print<R: Column, F: Fn(&R) -> String>(rows: &[(&str, F)], reports: &[R]) {
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
    print!("{:first$}", "");
    for (r, width) in reports.iter().zip(&widths) {
        print!("{:>width$}", r.label());
    }
    println!();
    for (i, (name, _)) in rows.iter().enumerate() {
        print!("{name:first$}");
        for (c, width) in cells.iter().zip(&widths) {
            print!("{:>width$}", c[i]);
        }
        println!();
    }
    for r in reports.iter().filter(|r| !r.causes().is_empty()) {
        println!("{} failures by cause:", r.label());
        for (cause, n) in r.causes() {
            println!("  {n:>4} x {cause}");
        }
    }
}
