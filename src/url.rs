//! URLs as errors and events show them: without a password. Engine-neutral, so that both
//! the engine choice (`engine`) and the PostgreSQL engine use it without importing each other.

/// `url` with the password of its user information (`user:secret@`) and of a `password=`
/// parameter replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut shown = url[..scheme_end].to_owned();
    match authority.rfind('@') {
        Some(at) => {
            let user_info = &authority[..at];
            match user_info.find(':') {
                Some(colon) => {
                    shown.push_str(&user_info[..colon]);
                    shown.push_str(":***");
                }
                None => shown.push_str(user_info),
            }
            shown.push_str(&authority[at..]);
        }
        None => shown.push_str(authority),
    }
    let tail = &rest[authority_end..];
    match tail.split_once('?') {
        None => shown.push_str(tail),
        Some((path, query)) => {
            shown.push_str(path);
            shown.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => param.to_owned(),
                })
                .collect();
            shown.push_str(&params.join("&"));
        }
    }
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
            ("postgresql://u:p%40w@h", "postgresql://u:***@h"),
        ] {
            assert_eq!(redact(url), shown);
        }
    }
}
