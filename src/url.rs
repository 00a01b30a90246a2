//! What a URL says, for both engines: the engine its scheme names (never found by trying
//! connection types in turn: SQLite accepts any string as a file name), and the URL as
//! errors and events show it, without a password. The handles of either engine
//! (`engine`) and the PostgreSQL engine both use it, without importing each other.

use crate::error::{Error, Result};

/// A database engine of this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// A SQLite file: a path, `sqlite://PATH`, `sqlite:PATH`, `file:PATH` or `:memory:`.
    Sqlite,
    /// A PostgreSQL server: `postgres://` or `postgresql://` (feature `postgres`).
    Postgres,
}

/// The schemes this build opens, for [`Error::UnsupportedUrl`].
pub(crate) const ENABLED: &str = match (cfg!(feature = "sqlite"), cfg!(feature = "postgres")) {
    (true, true) => "sqlite: a path, sqlite:, file:; postgres: postgres://, postgresql://",
    (true, false) => "sqlite: a path, sqlite:, file:; postgres:// needs the Cargo feature postgres",
    _ => "postgres: postgres://, postgresql://; a path needs the Cargo feature sqlite",
};

impl Engine {
    /// The engine `url` names, by its scheme: `postgres://` and `postgresql://` are
    /// PostgreSQL; a path, `sqlite:` and `file:` are SQLite; any other `scheme://` is
    /// refused, as is PostgreSQL when the `postgres` feature is off.
    ///
    /// # Errors
    /// [`Error::UnsupportedUrl`], naming the scheme and the engines this build has.
    ///
    /// # Examples
    /// ```
    /// use sqlite_persistence::Engine;
    ///
    /// assert_eq!(Engine::of("data/app.db").unwrap(), Engine::Sqlite);
    /// assert_eq!(Engine::of("sqlite:///srv/app.db").unwrap(), Engine::Sqlite);
    /// assert!(Engine::of("mysql://db/app").is_err());
    /// ```
    pub fn of(url: &str) -> Result<Engine> {
        let lower = url.trim_start().to_ascii_lowercase();
        if lower.starts_with("sqlite:") || lower.starts_with("file:") {
            return Ok(Engine::Sqlite);
        }
        let Some(scheme) = scheme(&lower) else {
            return Ok(Engine::Sqlite);
        };
        match scheme {
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Ok(Engine::Postgres),
            _ => Err(Error::UnsupportedUrl {
                url: redact(url),
                scheme: scheme.to_owned(),
                enabled: ENABLED,
            }),
        }
    }
}

/// The scheme of `url` when it has the form `scheme://`.
fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// [`Error::UnsupportedUrl`] unless `url` names `engine`.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn expect(url: &str, engine: Engine) -> Result<()> {
    let found = Engine::of(url)?;
    if found == engine {
        return Ok(());
    }
    Err(Error::UnsupportedUrl {
        url: redact(url),
        scheme: scheme(&url.to_ascii_lowercase())
            .unwrap_or("sqlite")
            .to_owned(),
        enabled: match engine {
            Engine::Sqlite => "this call opens SQLite; use Options::open_url for any engine",
            Engine::Postgres => "this call opens PostgreSQL; use Options::open_url for any engine",
        },
    })
}

/// `url` as this crate shows it in errors, `tracing` events and
/// [`PgDatabase::url`](crate::PgDatabase): with the password of its user information and
/// the values of its `password=` and `sslpassword=` parameters replaced by `***`, by libpq's
/// own reading of the URL. For
/// applications that log the URLs they open.
///
/// # Examples
/// ```
/// assert_eq!(
///     sqlite_persistence::redact_url("postgresql://app:s3cret@db/app?password=x"),
///     "postgresql://app:***@db/app?password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    redact(url)
}

/// `url` with the password of its user information (`user:secret@`) and the values of its
/// `password=` and `sslpassword=` parameters replaced by `***`, by libpq's own reading: the user information runs to the
/// first `@` before any `/` (a `?` or `#` in it is the password's: libpq logs in with
/// `postgresql://app:ok?Secret9@/db`). A password with an unencoded `/`, which libpq does
/// not take for one, is hidden too (up to an `@` that comes before any `?`), and so is one
/// with an unencoded `@` (up to the last `@` before the host's end).
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let mut shown = url[..scheme_end].to_owned();
    // libpq: the user information ends at the first '@' before a '/'.
    let user_info_end = match rest.find(['@', '/']) {
        Some(at) if rest[at..].starts_with('@') => Some(at),
        // Not for libpq, but a password all the same: "app:pa/ss@host".
        _ => rest
            .find('@')
            .filter(|&at| !rest[..at].contains('?') && rest[..at].contains(':')),
    };
    // An unencoded '@' in the password: the user information runs to the last '@' before
    // the host's end (libpq would read a password cut short, and a host with the rest).
    let user_info_end = user_info_end.map(|first| {
        let host_end = rest[first..]
            .find(['/', '?'])
            .map_or(rest.len(), |end| first + end);
        rest[..host_end].rfind('@').unwrap_or(first)
    });
    let after_user = match user_info_end {
        Some(at) => {
            let user_info = &rest[..at];
            match user_info.find(':') {
                Some(colon) => {
                    shown.push_str(&user_info[..colon]);
                    shown.push_str(":***");
                }
                None => shown.push_str(user_info),
            }
            shown.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    match after_user.split_once('?') {
        None => shown.push_str(after_user),
        Some((path, query)) => {
            shown.push_str(path);
            shown.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    // libpq's two secrets: the password, and the one of the client's key.
                    Some((key, _))
                        if ["password", "sslpassword"]
                            .iter()
                            .any(|secret| decoded(key).eq_ignore_ascii_case(secret)) =>
                    {
                        format!("{key}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            shown.push_str(&params.join("&"));
        }
    }
    shown
}

/// A URL's component with its `%XX` escapes decoded, as libpq reads it (`pass%77ord` is
/// `password`); an escape that is not one is kept as it is.
fn decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with the parameter `key=value` added to its query, unless the query sets `key`
/// already: where libpq reads the query, after the user information (which runs to the first
/// `@` before a `/`, and may hold a `?` of a password's).
#[cfg(feature = "postgres")]
pub(crate) fn with_default_param(url: &str, key: &str, value: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let after_user = match rest.find(['@', '/']) {
        Some(at) if rest[at..].starts_with('@') => scheme_end + at + 1,
        _ => scheme_end,
    };
    let query = url[after_user..].find('?').map(|q| after_user + q + 1);
    if let Some(start) = query {
        let set = url[start..].split('&').any(|param| {
            param
                .split_once('=')
                .is_some_and(|(k, _)| decoded(k).eq_ignore_ascii_case(key))
        });
        if set {
            return url.to_owned();
        }
    }
    let joiner = match query {
        Some(start) if start == url.len() || url.ends_with('&') => "",
        Some(_) => "&",
        None => "?",
    };
    format!("{url}{joiner}{key}={value}")
}

/// A libpq `keyword=value` string with the value of `password` and of `sslpassword` (bare,
/// or quoted with `'`) replaced by `***`.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn redact_keywords(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut shown = String::new();
    let mut rest = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password") {
        let key = search + found;
        search = key + "password".len();
        let after = lower[search..].trim_start();
        let Some(value) = after.strip_prefix('=') else {
            continue;
        };
        let value_start = text.len() - value.trim_start().len();
        let value_text = &text[value_start..];
        let value_len = if let Some(quoted) = value_text.strip_prefix('\'') {
            // Up to the closing quote (\' escapes one), or the end.
            let mut end = quoted.len();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            1 + end
        } else {
            value_text
                .find(char::is_whitespace)
                .unwrap_or(value_text.len())
        };
        shown.push_str(&text[rest..value_start]);
        shown.push_str("***");
        rest = value_start + value_len;
        search = rest;
    }
    shown.push_str(&text[rest..]);
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db.example:5432/app",
                "postgres://app:***@db.example:5432/app",
            ),
            ("postgresql://app@db/app", "postgresql://app@db/app"),
            (
                "postgresql:///t1?host=/tmp/x&user=postgres&password=p@ss",
                "postgresql:///t1?host=/tmp/x&user=postgres&password=***",
            ),
            (
                "postgresql:///t1?host=/tmp/x&sslpassword=k3y&ss%6cpassword=k3y",
                "postgresql:///t1?host=/tmp/x&sslpassword=***&ss%6cpassword=***",
            ),
            ("postgresql://u:p%40w@h", "postgresql://u:***@h"),
            // libpq decodes the keys too: pass%77ord is password.
            (
                "postgresql:///txapp?host=/tmp/x&user=postgres&pass%77ord=topsecret5",
                "postgresql:///txapp?host=/tmp/x&user=postgres&pass%77ord=***",
            ),
            (
                "postgresql:///db?%50ASSWORD=topsecret5",
                "postgresql:///db?%50ASSWORD=***",
            ),
            // libpq reads a ? in the user information as the password's.
            (
                "postgresql://app:ok?Secret9@/db?host=/tmp/x",
                "postgresql://app:***@/db?host=/tmp/x",
            ),
            (
                "postgresql://app:ok#Secret9@localhost/db",
                "postgresql://app:***@localhost/db",
            ),
            // An unencoded / is no password to libpq, but one to whoever typed it.
            (
                "postgresql://app:pa/ss@host/db",
                "postgresql://app:***@host/db",
            ),
            // An @ in a parameter is no user information.
            (
                "postgresql://host:5432/db?options=a@b",
                "postgresql://host:5432/db?options=a@b",
            ),
            (
                "postgresql://app:s@cret@host/db",
                "postgresql://app:***@host/db",
            ),
        ] {
            assert_eq!(redact(url), shown);
        }
        for (text, shown) in [
            (
                "dbname=sec user=app password=SECRET",
                "dbname=sec user=app password=***",
            ),
            (
                "password = 'se cr\\'et' host=/tmp",
                "password = *** host=/tmp",
            ),
            ("host=/tmp PASSWORD=x", "host=/tmp PASSWORD=***"),
            ("sslpassword=k3y host=/tmp", "sslpassword=*** host=/tmp"),
            ("user=app", "user=app"),
        ] {
            assert_eq!(redact_keywords(text), shown, "{text}");
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn a_default_parameter_goes_where_libpq_reads_the_query() {
        for (url, with) in [
            ("postgresql://h/db", "postgresql://h/db?connect_timeout=5"),
            ("postgresql://h/db?", "postgresql://h/db?connect_timeout=5"),
            (
                "postgresql:///db?host=/tmp",
                "postgresql:///db?host=/tmp&connect_timeout=5",
            ),
            // The ? of a password is no query.
            (
                "postgresql://app:ok?x@/db",
                "postgresql://app:ok?x@/db?connect_timeout=5",
            ),
            (
                "postgresql://h/db?CONNECT_TIMEOUT=1",
                "postgresql://h/db?CONNECT_TIMEOUT=1",
            ),
            (
                "postgresql://h/db?user=a&connect_timeout=0",
                "postgresql://h/db?user=a&connect_timeout=0",
            ),
        ] {
            assert_eq!(
                with_default_param(url, "connect_timeout", "5"),
                with,
                "{url}"
            );
        }
    }
}
