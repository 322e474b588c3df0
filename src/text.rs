//! Counted nouns in messages: "1 policy", "2 policies", "0 problems". Every
//! message a user reads that states a count goes through [`count`], so none
//! says "1 policies" or "problem(s)".

use std::fmt;

/// `n` and the noun in the number `n` needs: [`count`] builds it.
#[derive(Debug, Clone, Copy)]
pub struct Count<'a> {
    n: usize,
    one: &'a str,
    many: &'a str,
}

/// "1 policy", "2 policies": `one` for exactly one, `many` otherwise (also 0).
pub fn count<'a>(n: usize, one: &'a str, many: &'a str) -> Count<'a> {
    Count { n, one, many }
}

impl fmt::Display for Count<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.n == 1 { self.one } else { self.many };
        write!(f, "{} {noun}", self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_zero_and_more_are_plural() {
        assert_eq!(count(0, "policy", "policies").to_string(), "0 policies");
        assert_eq!(count(1, "policy", "policies").to_string(), "1 policy");
        assert_eq!(count(2, "problem", "problems").to_string(), "2 problems");
        assert_eq!(format!("[{}]", count(1, "file", "files")), "[1 file]");
    }
}
