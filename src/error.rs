//! Printing an error with its causes, once each: `{:#}` of anyhow, for the
//! places that keep or show an error as text without going through anyhow (the
//! daemon's status, log fields).
//!
//! Owns only the printing; the error types are their modules'. Every error
//! type of this crate says in its message what failed, and returns
//! why as its `source` without repeating it in the message (so a chain printed
//! with [`Chain`] or anyhow's `{:#}` names each cause once).

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause of the cause`, as anyhow's `{:#}` does.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// The whole chain as one line.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_names_each_cause_once_like_anyhow() {
        let e = Outer(std::io::Error::from_raw_os_error(13));
        let text = chain(&e);
        assert_eq!(text, "outer: Permission denied (os error 13)");
        assert_eq!(text, format!("{:#}", anyhow::Error::from(e)));
    }
}
