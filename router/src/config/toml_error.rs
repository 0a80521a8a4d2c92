//! Errors in a TOML file, with the line (and column) they point at; shared by `router.toml` and
//! the catalog.

use std::ops::Range;

/// A TOML file that was rejected, located by line.
#[derive(Debug, thiserror::Error)]
pub enum TomlError {
    /// TOML syntax error, unknown key or a value of the wrong type.
    #[error("{file}:{line}:{col}: {message}")]
    Parse {
        /// File name as given to the parser.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// Well-formed TOML whose values do not make a valid file (bad id, duplicate, half-set pair).
    #[error("{file}:{line}: {message}")]
    Invalid {
        /// File name as given to the parser.
        file: String,
        /// 1-based line of the offending value.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl TomlError {
    /// A syntax error at `span` of `text` (line 1, column 1 when the parser gave no span).
    pub(crate) fn parse(
        text: &str,
        file: &str,
        span: Option<Range<usize>>,
        message: &str,
    ) -> TomlError {
        let (line, col) = span.map_or((1, 1), |span| line_col(text, span.start));
        TomlError::Parse {
            file: file.to_owned(),
            line,
            col,
            message: message.trim_end().to_owned(),
        }
    }

    /// A value at `span` of `text` that is not valid.
    pub(crate) fn invalid(
        text: &str,
        file: &str,
        span: Range<usize>,
        message: String,
    ) -> TomlError {
        TomlError::Invalid {
            file: file.to_owned(),
            line: line_col(text, span.start).0,
            message,
        }
    }
}

/// Converts a byte offset into a 1-based (line, column in characters) pair.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("x", 99), (1, 2));
    }

    #[test]
    fn parse_error_without_span_points_at_the_start() {
        let e = TomlError::parse("a = 1\n", "f.toml", None, "bad\n");
        assert_eq!(e.to_string(), "f.toml:1:1: bad");
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = "a = 1\nb = é2\n";
        let e = TomlError::parse(text, "f.toml", Some(12..13), "expected a value");
        assert_eq!(e.to_string(), "f.toml:2:6: expected a value");
        let e = TomlError::invalid(text, "f.toml", 6..7, "b is wrong".to_owned());
        assert_eq!(e.to_string(), "f.toml:2: b is wrong");
    }
}
