//! Error chains as one line, for logs and panic messages.
#![forbid(unsafe_code)]

use std::{error::Error, fmt::Write as _};

/// `error` followed by each of its sources, separated by `: `.
#[must_use]
pub fn report(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_error_chain() {
        let error = crate::kernel::CgroupError::Stat {
            path: "/x".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(report(&error), "failed to stat /x: gone");
    }
}
