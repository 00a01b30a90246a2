//! Bad input through the command line: a clear `error: ` line, a non-zero exit, and the
//! database file left exactly as it was (or not created at all).

mod common;

use std::path::Path;
use std::process::Command;

fn run(args: &[&str], db: &Path) -> (bool, String) {
    let output = Command::new(common::binary())
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_byte_for_byte() {
    let (dir, db) = common::fresh_db();
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &bytes).unwrap();
    let (ok, stderr) = run(&["migrate"], &db);
    assert!(!ok);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("is not a SQLite database"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes);
    assert_eq!(
        files_in(dir.path()),
        ["catalog.db"],
        "no -wal or -shm left behind"
    );
}

#[test]
fn a_directory_and_a_missing_parent_are_named_as_such() {
    let (dir, _) = common::fresh_db();
    let (ok, stderr) = run(&["migrate"], dir.path());
    assert!(!ok);
    assert!(stderr.contains("is a directory"), "{stderr}");
    let missing = dir.path().join("nope").join("x.db");
    let (ok, stderr) = run(&["migrate"], &missing);
    assert!(!ok);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn a_bad_artifact_name_creates_nothing() {
    let (dir, db) = common::fresh_db();
    for name in ["", "a\tb"] {
        let (ok, stderr) = run(&["record", "--artifact", name], &db);
        assert!(!ok);
        assert!(
            stderr.starts_with("error: invalid artifact name"),
            "{stderr}"
        );
    }
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn status_of_a_missing_file_does_not_create_it() {
    let (dir, db) = common::fresh_db();
    let output = Command::new(common::binary())
        .args(["status", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(output.status.success());
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["exists"], false);
    assert_eq!(status["pending"].as_array().unwrap().len(), 3);
    assert!(files_in(dir.path()).is_empty());
}
