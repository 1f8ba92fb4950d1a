//! Showing an error with its causes. Each error's message says its own part only (`cannot
//! read /x`), its cause is its `source`; whatever shows an error (`main`, a warning in the
//! log) shows the whole chain with [`chain`].

use std::{error::Error, fmt};

/// The error `e` and its causes (its `source` chain) on one line, each once, separated by
/// `: `: a cause whose text is already on the line (an error of another crate may name its
/// cause itself) is not repeated. A cause of several lines (aya's errors end with the
/// verifier's log) gives its first line there, and the rest follows below it.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    let mut rest = String::new();
    for cause in std::iter::successors(Some(e), |&e| e.source()) {
        let text = cause.to_string();
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default().trim_end();
        if first.is_empty() || line.contains(first) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(first);
        let more = lines.collect::<Vec<_>>().join("\n");
        if !more.is_empty() && !rest.contains(&more) {
            rest.push('\n');
            rest.push_str(&more);
        }
    }
    line + &rest
}

/// An error shown with its causes ([`chain`]), for log lines: `log::warn!("{}", Chain(&e))`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Read {
        path: String,
        source: std::io::Error,
    }

    /// An error of another crate that names its cause itself.
    #[derive(Debug, thiserror::Error)]
    #[error("loading failed: {source}")]
    struct Loading {
        source: Read,
    }

    #[test]
    fn each_cause_is_shown_once() {
        let read = || Read {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            Chain(&read()).to_string(),
            "cannot read /x: No such file or directory (os error 2)"
        );
        assert_eq!(
            chain(&Loading { source: read() }),
            "loading failed: cannot read /x: No such file or directory (os error 2)"
        );
    }
}
