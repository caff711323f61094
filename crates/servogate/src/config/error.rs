//! [`ConfigError`] and how it renders (`FILE:LINE:COL: KEY: MESSAGE`), and the heuristics
//! that give toml's own errors (syntax, unknown keys, wrong types) a key path: toml knows
//! the span but not the key, so the path is recovered from the text around the span
//! (`Source::key_at`), and its Rust type names are reworded (`friendly`). Our own checks
//! know their key and take the position from the value's span (`Source::at`, in
//! `source.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::source::Source;

/// A config error, with where it is. `Display` is the one-line message
/// `FILE:LINE:COL: KEY: MESSAGE` (without `LINE:COL` when the file could not be read, and
/// without `KEY` when the error is not about one key, e.g. a syntax error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(self))]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the error has a place in the file.
    pub line: Option<usize>,
    /// 1-based column (in characters), with `line`.
    pub column: Option<usize>,
    /// The key path, e.g. `devices[2].bus` or `profiles.acme-ax.position.type`.
    pub key: Option<String>,
    pub message: String,
}

fn render(e: &ConfigError) -> String {
    let mut s = e.file.display().to_string();
    if let Some(line) = e.line {
        let _ = write!(s, ":{line}");
        if let Some(col) = e.column {
            let _ = write!(s, ":{col}");
        }
    }
    s.push_str(": ");
    if let Some(key) = &e.key {
        s.push_str(key);
        s.push_str(": ");
    }
    s.push_str(&e.message);
    s
}

impl Source<'_> {
    /// The dotted key path of the item at byte `offset`, for toml's own errors: the
    /// enclosing `[table]` or `[[array]]` header (with the array index) and the key on the
    /// offset's line; inside an inline table, both the outer and the inner key.
    pub(super) fn key_at(&self, offset: usize) -> Option<String> {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let head = &self.text[..offset];
        let line_begin = head.rfind('\n').map_or(0, |p| p + 1);
        // The table header above the offset's line, and how many [[same]] came before.
        let mut table = String::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut on_header = false;
        for line in self.text[..line_begin].split('\n') {
            if let Some(name) = header(line) {
                table = name;
            }
            if let Some(name) = array_header(line) {
                let n = counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
            }
        }
        let line_end = self.text[line_begin..]
            .find('\n')
            .map_or(self.text.len(), |p| line_begin + p);
        let line = &self.text[line_begin..line_end];
        if let Some(name) = array_header(line) {
            let n = counts.get(&name).copied().unwrap_or(0);
            table = format!("{name}[{n}]");
            on_header = true;
        } else if let Some(name) = header(line) {
            table = name;
            on_header = true;
        }
        let mut keys: Vec<String> = Vec::new();
        if !on_header {
            let rel = offset - line_begin;
            let clean = |k: &str| k.trim().trim_matches(['"', '\'']).to_owned();
            if let Some((outer, _)) = line.split_once('=') {
                if !outer.trim_start().starts_with('#') {
                    keys.push(clean(outer));
                }
            }
            let rest = &line[rel.min(line.len())..];
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let points_at_key =
                !ident.is_empty() && rest[ident.len()..].trim_start().starts_with('=');
            let inner = if points_at_key {
                Some(ident)
            } else {
                line[..rel.min(line.len())]
                    .rsplit_once('=')
                    .and_then(|(before, _)| {
                        before
                            .rsplit([',', '{', ' '])
                            .find(|s| !s.trim().is_empty())
                            .map(clean)
                    })
            };
            if let Some(inner) = inner {
                if keys.first() != Some(&inner) {
                    keys.push(inner);
                }
            }
        }
        let mut path = table;
        for k in keys.into_iter().filter(|k| !k.is_empty()) {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k);
        }
        (!path.is_empty()).then_some(path)
    }
}

/// toml's messages name Rust types (`expected u32`); say what to write instead.
pub(super) fn friendly(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, toml) in [
        ("expected u8", "expected an integer 0 to 255"),
        ("expected u16", "expected an integer 0 to 65535"),
        ("expected u32", "expected an integer 0 to 4294967295"),
        ("expected usize", "expected an integer of at least 0"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        (
            "expected a sequence",
            "expected an array of tables (write [[name]] headers)",
        ),
        ("expected a string", "expected a string (in quotes)"),
    ] {
        if let Some(rest) = m.strip_suffix(rust) {
            m = format!("{rest}{toml}");
        }
    }
    m
}

/// `[header]` of a line, if it is one (not `[[array]]`).
fn header(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.starts_with("[[") {
        return None;
    }
    let rest = t.strip_prefix('[')?;
    let end = rest.find(']')?;
    Some(rest[..end].trim().to_owned())
}

/// `[[array]]` of a line, if it is one.
fn array_header(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("[[")?;
    let end = rest.find("]]")?;
    Some(rest[..end].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::{err, line_of, GOOD};

    #[test]
    fn an_unknown_key_names_its_line_and_the_key() {
        let text = GOOD.replace("baud = 115200", "baud = 115200\nbaudrate = 9600");
        let e = err(&text);
        let line = line_of(&text, "baudrate");
        assert!(
            e.starts_with(&format!(
                "t.toml:{line}:1: buses[0].baudrate: unknown field `baudrate`"
            )),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_inside_an_inline_table_names_the_inner_key() {
        let text = GOOD.replace("unit = \"mm\"", "unit = \"mm\", scael = 2");
        let e = err(&text);
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(
            e.contains("profiles.ax.position.scael: unknown field `scael`"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_table_names_its_line() {
        let text = format!("{GOOD}\n[mqqt]\nurl = \"mqtt://x\"\n");
        let e = err(&text);
        let line = line_of(&text, "[mqqt]");
        assert!(e.starts_with(&format!("t.toml:{line}:")), "{e}");
        assert!(e.contains("mqqt"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_its_line_and_the_key() {
        let e = err(&GOOD.replace("baud = 115200", "baud = \"fast\""));
        assert!(
            e.starts_with("t.toml:12:8: buses[0].baud: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_wrong_type_inside_an_inline_table_names_the_inner_key() {
        let e = err(&GOOD.replace("scale = 0.001", "scale = \"tiny\""));
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(e.contains("profiles.ax.position.scale"), "{e}");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let e = err(&GOOD.replace("unit = 1", "unit = = 1"));
        assert!(e.starts_with("t.toml:17:"), "{e}");
    }

    #[test]
    fn a_missing_key_names_its_table() {
        let text = GOOD.replace("profile = \"ax\"\n", "");
        let e = err(&text);
        let line = line_of(&text, "[[devices]]");
        assert!(e.contains("missing field `profile`"), "{e}");
        assert!(e.starts_with(&format!("t.toml:{line}:")), "{e}");
        assert!(e.contains("devices[0]"), "{e}");
    }

    #[test]
    fn a_missing_gateway_is_an_error_with_a_position() {
        let e = err("[mqtt]\nqos = 1\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
        assert!(e.contains("gateway"), "{e}");
    }
}
