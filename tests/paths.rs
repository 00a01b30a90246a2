//! The forms a database path comes in (`DATABASE_URL` included): each names the file it
//! should, or is refused before anything is created.

mod common;

use common::{bump, fresh_db, MIGRATIONS};
use sqlite_persistence::{Error, Options};

#[test]
fn url_forms_and_a_leading_double_slash_name_the_same_file() {
    let (dir, path) = fresh_db();
    let text = path.to_str().unwrap();
    let forms = [
        text.to_owned(),
        format!("/{text}"),
        format!("sqlite://{text}"),
        format!("sqlite:{text}"),
        format!("file:{text}"),
    ];
    for (i, form) in forms.iter().enumerate() {
        let db = Options::new().open(form, MIGRATIONS).unwrap();
        assert_eq!(bump(&db, "a").unwrap().0, i as i64 + 1, "{form}");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.ends_with("-wal") && !name.ends_with("-shm"))
        .collect();
    names.sort();
    assert_eq!(names, ["app.db", "app.db-lock"]);
}

#[test]
fn uri_parameters_and_other_engines_urls_are_refused_and_nothing_is_created() {
    let (dir, path) = fresh_db();
    let text = path.to_str().unwrap();
    for form in [
        format!("file:{text}?mode=ro"),
        format!("{text}?cache=shared"),
        "postgresql:///app?host=/tmp".to_owned(),
    ] {
        match Options::new().open(&form, MIGRATIONS) {
            Err(Error::InvalidPath { reason, .. }) => assert!(!reason.is_empty()),
            other => panic!("{form}: expected InvalidPath, got {:?}", other.map(drop)),
        }
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

/// With `create_if_missing(false)` a missing file is refused by name and nothing is
/// created; an existing one opens as always.
#[test]
fn without_create_if_missing_a_missing_file_is_refused_and_nothing_created() {
    let (dir, path) = fresh_db();
    match Options::new()
        .create_if_missing(false)
        .open(&path, MIGRATIONS)
    {
        Err(Error::MissingDatabase { path: p }) => assert_eq!(p, path),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(common::file_names(dir.path()).is_empty());
    drop(Options::new().open(&path, MIGRATIONS).unwrap());
    let db = Options::new()
        .create_if_missing(false)
        .open(&path, MIGRATIONS)
        .unwrap();
    assert_eq!(bump(&db, "a").unwrap().0, 1);
}
