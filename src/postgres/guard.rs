//! A migration may not end the batch's transaction. On PostgreSQL a `COMMIT` in a migration's
//! SQL would commit the batch so far (and release the advisory lock with it), leaving it
//! half applied while the rest fails; there is no authorizer to refuse it as SQLite's is
//! refused, so the SQL is read before anything runs: PostgreSQL's lexical rules (quoted
//! strings and identifiers, dollar quoting, nested comments) decide where statements begin,
//! and a statement beginning with a transaction command is refused. Savepoints stay allowed,
//! as on SQLite; a `BEGIN ATOMIC ... END` function body is not a transaction command.

/// The first transaction command among `sql`'s statements, as written (`COMMIT`,
/// `ROLLBACK`, `START TRANSACTION`, ...), if any.
pub(crate) fn transaction_command(sql: &str) -> Option<String> {
    let mut atomic_bodies = 0usize;
    for statement in statements(sql) {
        let words: Vec<String> = statement
            .split(|c: char| c.is_whitespace() || c == '(')
            .filter(|w| !w.is_empty())
            .take(2)
            .map(str::to_ascii_uppercase)
            .collect();
        let first = words.first().map(String::as_str).unwrap_or("");
        let second = words.get(1).map(String::as_str).unwrap_or("");
        if atomic_bodies > 0 {
            // Inside `BEGIN ATOMIC ... END`: its statements, and the END that closes it.
            if first == "END" {
                atomic_bodies -= 1;
            }
            atomic_bodies += count_begin_atomic(&statement);
            continue;
        }
        let control = match first {
            "BEGIN" | "COMMIT" | "END" | "ABORT" => true,
            "START" => second == "TRANSACTION",
            "ROLLBACK" => second != "TO",
            "PREPARE" => second == "TRANSACTION",
            _ => false,
        };
        if control {
            return Some(words.join(" "));
        }
        atomic_bodies += count_begin_atomic(&statement);
    }
    None
}

/// How many `BEGIN ATOMIC` (an SQL-standard function body) open in `statement`.
fn count_begin_atomic(statement: &str) -> usize {
    let words: Vec<String> = statement
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    words
        .windows(2)
        .filter(|w| w[0] == "BEGIN" && w[1].starts_with("ATOMIC"))
        .count()
}

/// `sql` split into statements at the semicolons outside strings, quoted identifiers,
/// dollar-quoted bodies and comments; comments removed, each statement trimmed, empty ones
/// left out.
fn statements(sql: &str) -> Vec<String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                current.push(' ');
                continue;
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                current.push(' ');
                continue;
            }
            '\'' | '"' => {
                // E'...' strings take backslash escapes; a doubled quote is one quote.
                let escapes = c == '\''
                    && i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && (i < 2 || !chars[i - 2].is_alphanumeric());
                current.push(c);
                i += 1;
                while i < chars.len() {
                    let d = chars[i];
                    current.push(d);
                    i += 1;
                    if escapes && d == '\\' {
                        if let Some(&escaped) = chars.get(i) {
                            current.push(escaped);
                            i += 1;
                        }
                    } else if d == c {
                        if chars.get(i) == Some(&c) {
                            current.push(c);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
                continue;
            }
            '$' => {
                if let Some(tag) = dollar_tag(&chars[i..]) {
                    // Not a parameter ($1) nor part of an identifier (a$b).
                    let in_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
                    if !in_word {
                        let body_start = i + tag.len();
                        let rest: String = chars[body_start..].iter().collect();
                        let end = rest.find(&tag).map_or(chars.len(), |at| {
                            body_start + rest[..at].chars().count() + tag.chars().count()
                        });
                        current.extend(&chars[i..end]);
                        i = end;
                        continue;
                    }
                }
            }
            ';' => {
                let statement = current.trim();
                if !statement.is_empty() {
                    statements.push(statement.to_owned());
                }
                current.clear();
                i += 1;
                continue;
            }
            _ => {}
        }
        current.push(c);
        i += 1;
    }
    let statement = current.trim();
    if !statement.is_empty() {
        statements.push(statement.to_owned());
    }
    statements
}

/// The dollar-quote tag (`$$`, `$body$`) that starts `chars`, if one does.
fn dollar_tag(chars: &[char]) -> Option<String> {
    let mut tag = String::from("$");
    for (n, &c) in chars.iter().enumerate().skip(1) {
        if c == '$' {
            tag.push('$');
            return Some(tag);
        }
        let valid = c == '_' || c.is_alphabetic() || (n > 1 && c.is_ascii_digit());
        if !valid {
            return None;
        }
        tag.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_commands_are_found_at_the_start_of_statements_only() {
        for (sql, found) in [
            ("CREATE TABLE t (x INT); COMMIT;", Some("COMMIT")),
            ("create table t (x int);\ncommit", Some("COMMIT")),
            ("BEGIN; CREATE TABLE t (x INT); END;", Some("BEGIN")),
            (
                "START TRANSACTION ISOLATION LEVEL SERIALIZABLE;",
                Some("START TRANSACTION"),
            ),
            ("ROLLBACK;", Some("ROLLBACK")),
            ("PREPARE TRANSACTION 'x';", Some("PREPARE TRANSACTION")),
            ("ABORT;", Some("ABORT")),
            // Savepoints, and a prepared statement, are not.
            (
                "SAVEPOINT s; CREATE TABLE t (x INT); ROLLBACK TO s; RELEASE s;",
                None,
            ),
            ("PREPARE q AS SELECT 1;", None),
            // Strings, identifiers, comments and function bodies are not statements.
            ("INSERT INTO t VALUES ('x; COMMIT; y');", None),
            ("INSERT INTO t VALUES (E'it\\'s; COMMIT');", None),
            ("CREATE TABLE \"a;commit\" (x INT);", None),
            (
                "-- COMMIT;\nCREATE TABLE t (x INT); /* ; COMMIT; /* nested; */ END; */",
                None,
            ),
            (
                "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 UPDATE t SET x = 1; COMMIT; END $$;",
                None,
            ),
            (
                "CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END \
                 $body$; COMMIT;",
                Some("COMMIT"),
            ),
            (
                "CREATE FUNCTION h() RETURNS int LANGUAGE SQL BEGIN ATOMIC SELECT 1; SELECT 2; \
                 END; CREATE TABLE t (x INT);",
                None,
            ),
            (
                "CREATE FUNCTION h() RETURNS int LANGUAGE SQL BEGIN ATOMIC SELECT 1; END; END;",
                Some("END"),
            ),
            ("SELECT $1; COMMIT", Some("COMMIT")),
        ] {
            assert_eq!(transaction_command(sql).as_deref(), found, "{sql}");
        }
    }
}
