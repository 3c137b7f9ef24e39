//! [`ConfigError`]: why a config could not be loaded, and where in the file. A value error is
//! pointed at its line and column once validation has failed, by finding its dotted key again
//! in the document (spans are not carried through validation); serde's type errors are put in
//! TOML's terms, never a Rust type's. Reads no file; `Config::load` adds the file's name.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Why a configuration could not be loaded. Its `Display` is the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was opened.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key has the wrong TOML type or is unknown.
    #[error("{}{key_prefix}{message} (line {line}, column {column})", file_prefix(.path))]
    Syntax {
        /// The file that was read; empty for [`Config::from_toml_str`](super::Config::from_toml_str).
        path: PathBuf,
        /// `"<dotted.key>: "`, or empty when the error is not inside a key or the message names
        /// the key itself.
        key_prefix: String,
        /// What the TOML parser reported, or serde's report put in TOML's terms.
        message: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error, in characters.
        column: usize,
    },
    /// A key has a value of the right TOML type that is not acceptable.
    #[error("{}invalid value for `{key}`: {value} (expected {expected}) ({at})", path_prefix(.path))]
    Invalid {
        /// The file that was read, if any.
        path: Option<PathBuf>,
        /// The dotted key, e.g. `server.listen`; an entry of an array by its index from 0, as in
        /// the wrong-type errors: `migration.brownouts[1].start`.
        key: String,
        /// The value as written (quoted when it was a string).
        value: String,
        /// What would have been accepted.
        expected: String,
        /// Where the value is in the file.
        at: Location,
    },
    /// A key of an earlier release that was replaced; the message names its replacement.
    #[error("{}`{key}` is no longer read: use `{replacement}` ({why}) ({at})", path_prefix(.path))]
    Replaced {
        /// The file that was read, if any.
        path: Option<PathBuf>,
        /// The old dotted key.
        key: &'static str,
        /// The dotted key that replaced it.
        replacement: &'static str,
        /// Why it changed.
        why: &'static str,
        /// Where the old key's value is in the file.
        at: Location,
    },
}

/// Where a bad value is in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The value starts at this 1-based line and character column; shown as
    /// `line L, column C`, like a syntax error.
    At {
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
    },
    /// The key is not in the file: its default does not fit with the value of another key (the
    /// message names it), e.g. the default `server.max_connections_per_ip` above a lowered
    /// `server.max_connections`. Shown as `default; not in the file`.
    Default,
}

/// `text` with the user information of every URL in it (`https://user:secret@host`) replaced
/// by `***`: a value echoed in an error (which a reload writes to the log and to the `/reload`
/// answer) never carries a credential an operator put in a URL by mistake.
pub(super) fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // To the end of the URL, not of its authority: a password may hold an unescaped `/`,
        // `?` or `#` (an `@` later in a path only redacts more).
        let url_end = tail.find(['"', '\'', ' ', '`', '\n']).unwrap_or(tail.len());
        match tail[..url_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::At { line, column } => write!(f, "line {line}, column {column}"),
            Location::Default => f.write_str("default; not in the file"),
        }
    }
}

fn file_prefix(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{}: ", path.display())
    }
}

fn path_prefix(path: &Option<PathBuf>) -> String {
    path.as_deref().map(file_prefix).unwrap_or_default()
}

impl ConfigError {
    /// A value error for `key`, not yet located (see [`ConfigError::located`]).
    pub(super) fn invalid(key: &str, value: String, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: None,
            key: key.to_owned(),
            value: without_userinfo(&value),
            expected: expected.into(),
            at: Location::Default,
        }
    }

    /// A TOML or serde error at `key` (empty or `.` for none) in `text`, with its position and
    /// a wrong type named in the file's terms.
    pub(super) fn syntax(text: &str, key: &str, err: toml::de::Error) -> Self {
        let (line, column) = err
            .span()
            .map(|s| line_column(text, s.start))
            .unwrap_or((1, 1));
        let message = err.message().trim_end();
        let key = if key == "." { "" } else { key };
        let found = DeTable::parse(text)
            .ok()
            .and_then(|doc| find(doc.get_ref(), key).map(|v| describe(v, text)));
        let (key_prefix, message) = match found.and_then(|found| wrong_type(key, message, &found)) {
            Some(sentence) => (String::new(), sentence),
            None if key.is_empty() => (String::new(), message.to_owned()),
            None => (format!("{key}: "), message.to_owned()),
        };
        let message = without_userinfo(&message);
        ConfigError::Syntax {
            path: PathBuf::new(),
            key_prefix,
            message,
            line,
            column,
        }
    }

    /// Points a value error at its key's value in `text`, or marks it as a default.
    pub(super) fn located(mut self, text: &str) -> Self {
        let (key, at): (&str, &mut Location) = match &mut self {
            ConfigError::Invalid { key, at, .. } => (key, at),
            ConfigError::Replaced { key, at, .. } => (key, at),
            _ => return self,
        };
        *at = DeTable::parse(text)
            .ok()
            .and_then(|doc| find(doc.get_ref(), key).map(|v| v.span().start))
            .map_or(Location::Default, |start| {
                let (line, column) = line_column(text, start);
                Location::At { line, column }
            });
        self
    }

    /// The same error, naming the file it came from.
    pub(super) fn with_path(mut self, file: &Path) -> Self {
        match &mut self {
            ConfigError::Syntax { path, .. } => *path = file.to_owned(),
            ConfigError::Invalid { path, .. } | ConfigError::Replaced { path, .. } => {
                *path = Some(file.to_owned());
            }
            ConfigError::Read { .. } => {}
        }
        self
    }
}

/// The value at `key` in a parsed document: dotted names, an array entry by `[index]`
/// (`migration.brownouts[1].start`), as serde_path_to_error writes paths. `None` when the file
/// does not have it.
fn find<'a, 'i>(root: &'a DeTable<'i>, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
    let mut value: Option<&Spanned<DeValue<'i>>> = None;
    for part in key.split('.') {
        let (name, mut indexes) = part.split_at(part.find('[').unwrap_or(part.len()));
        value = Some(match value {
            None => root.get(name)?,
            Some(v) => v.get_ref().get(name)?,
        });
        while let Some(rest) = indexes.strip_prefix('[') {
            let (index, rest) = rest.split_once(']')?;
            value = Some(value?.get_ref().get(index.parse::<usize>().ok()?)?);
            indexes = rest;
        }
    }
    value
}

/// A value found in the file, as a sentence can name it.
struct Found {
    /// `the string "x"`, `-5`, `the unquoted date 2027-06-30`, `an array`, `a table`...
    words: String,
    /// Whether it is a non-negative integer.
    non_negative_integer: bool,
    /// The text of a TOML date or time, which the operator meant as a string.
    datetime: Option<String>,
}

fn describe(v: &Spanned<DeValue<'_>>, text: &str) -> Found {
    let written = text.get(v.span()).unwrap_or_default().trim().to_owned();
    let mut found = Found {
        words: written.clone(),
        non_negative_integer: false,
        datetime: None,
    };
    match v.get_ref() {
        DeValue::String(s) => found.words = format!("the string {s:?}"),
        DeValue::Integer(_) => found.non_negative_integer = !written.starts_with('-'),
        DeValue::Float(_) | DeValue::Boolean(_) => {}
        DeValue::Datetime(d) => {
            let kind = match (d.date.is_some(), d.time.is_some()) {
                (true, false) => "date",
                (false, true) => "time",
                _ => "date-time",
            };
            found.words = format!("the unquoted {kind} {written}");
            found.datetime = Some(written);
        }
        DeValue::Array(_) => found.words = "an array".into(),
        DeValue::Table(_) => found.words = "a table".into(),
    }
    found
}

/// serde's report of a value of the wrong TOML type (`invalid type: map, expected u32`) as
/// "`key` must be ..., not ...", in the file's terms. `None` for other reports (unknown or
/// missing keys), which keep serde's wording.
fn wrong_type(key: &str, message: &str, found: &Found) -> Option<String> {
    let (_, expected) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?
        .rsplit_once(", expected ")?;
    let largest = match expected {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    let expected = match (expected, largest) {
        (_, Some(max)) if found.non_negative_integer => format!("a whole number from 0 to {max}"),
        (_, Some(_)) => "a non-negative whole number".into(),
        ("a string", _) => match &found.datetime {
            Some(written) => format!("a quoted string like \"{written}\""),
            None => "a quoted string".into(),
        },
        ("a boolean", _) => "true or false".into(),
        ("a sequence", _) if found.words == "a table" => {
            format!("an array (an array of tables is written with double brackets: [[{key}]])")
        }
        ("a sequence", _) => "an array".into(),
        ("a map", _) => "a table".into(),
        (s, _) if s.starts_with("struct ") => "a table".into(),
        _ => return None,
    };
    Some(format!("`{key}` must be {expected}, not {}", found.words))
}

/// 1-based line and character column of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
