//! Reading TOML files (the topology config and the model files) with errors that name the file,
//! the line and the field, so an operator can fix the file without guessing.

use serde::de::DeserializeOwned;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A file that was read but whose content is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: field `{field}`: {message}", file.display())]
pub struct FileError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// Dotted key path, for example `lb_frontends.external_traffic_policy`.
    pub field: String,
    pub message: String,
}

/// Why a TOML file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}; check the path and its permissions", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] FileError),
}

/// Reads `file` and deserializes it, mapping errors to [`LoadError`].
pub(crate) fn read_toml<T: DeserializeOwned>(file: &Path) -> Result<(T, String), LoadError> {
    let text = std::fs::read_to_string(file).map_err(|source| LoadError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let value = parse_toml(file, &text)?;
    Ok((value, text))
}

/// Deserializes `text` (the content of `file`, which only names the origin in errors).
pub(crate) fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim().to_string();
        let field = match backticked_after(&message, "missing field ") {
            Some(missing) => join_key(header_before(text, line_of(text, span.start)), missing),
            None => key_at(text, span.start),
        };
        FileError::at(file, text, span, field, message)
    })
}

impl FileError {
    /// An error about the value at byte range `span` of `text`.
    pub(crate) fn at(
        file: &Path,
        text: &str,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> FileError {
        FileError {
            file: file.to_path_buf(),
            line: line_of(text, span.start) + 1,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// 0-based line holding byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn backticked_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split('`').next()
}

/// The `[table]` or `[[array]]` header in force at 0-based `line`, without brackets.
fn header_before(text: &str, line: usize) -> Option<&str> {
    text.lines()
        .take(line + 1)
        .filter_map(|l| {
            let l = l.trim();
            let inner = l.strip_prefix("[[").and_then(|l| l.split("]]").next());
            inner.or_else(|| l.strip_prefix('[').and_then(|l| l.split(']').next()))
        })
        .last()
        .map(str::trim)
}

fn join_key(header: Option<&str>, key: &str) -> String {
    match header {
        Some(h) => format!("{h}.{key}"),
        None => key.to_string(),
    }
}

/// The dotted key whose value contains byte `offset`: the nearest `key =` line at or above it
/// (values may span lines, as arrays do), under the header in force there. Inside an inline
/// table (`{ kind = "x" }`) the key before the offset on its line is appended.
fn key_at(text: &str, offset: usize) -> String {
    let line = line_of(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let header = header_before(text, line);
    let key = lines
        .iter()
        .take(line + 1)
        .rev()
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|l| assignment_key(l));
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let inner = inline_key(&text[line_start..offset.min(text.len())]).filter(|k| Some(*k) != key);
    let path = match (key, inner) {
        (Some(k), Some(i)) => format!("{k}.{i}"),
        (Some(k), None) => k.to_string(),
        (None, _) => return header.unwrap_or("(document)").to_string(),
    };
    join_key(header, &path)
}

/// In `{ kind = "x", label = ` the key being assigned at the end: `label`.
fn inline_key(before: &str) -> Option<&str> {
    let before = before.trim_end().strip_suffix('=')?.trim_end();
    let start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .map_or(0, |i| i + 1);
    let key = &before[start..];
    (!key.is_empty() && before[..start].trim_end().ends_with(['{', ','])).then_some(key)
}

fn assignment_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // fields exist to be deserialized and rejected
    struct Doc {
        name: String,
        ports: Vec<u16>,
        #[serde(default)]
        item: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        ip: std::net::IpAddr,
    }

    fn err(text: &str) -> FileError {
        parse_toml::<Doc>(Path::new("x.toml"), text).unwrap_err()
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err("name = \"a\"\nports = [\n  80,\n  \"http\",\n]\n");
        assert_eq!((e.line, e.field.as_str()), (4, "ports"), "{e}");
        let e = err("name = \"a\"\nports = []\n\n[[item]]\nip = \"10.0.0.300\"\n");
        assert_eq!((e.line, e.field.as_str()), (5, "item.ip"), "{e}");
        let e = err("name = \"a\"\nports = []\n[[item]]\nipp = \"10.0.0.3\"\n");
        assert_eq!((e.line, e.field.as_str()), (4, "item.ipp"), "{e}");
        let e = err("ports = []\n");
        assert_eq!(e.field, "name", "{e}");
        assert!(e
            .to_string()
            .starts_with("x.toml:1: field `name`: missing field"));
    }
}
