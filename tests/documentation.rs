//! Keeps the docs honest. The configuration reference (docs/configuration.md, and the limits of
//! SECURITY.md) against the config loader and config.toml: every documented key exists, every
//! key the loader accepts is documented, and every default shown as a value is the loader's and
//! config.toml's. Every `oauth_apps_gateway_` metric name in README.md, docs/ and deploy/ against
//! a real scrape after traffic of every kind, and every scraped family against the metrics
//! reference. Every relative link and `#anchor` in README.md, SECURITY.md, docs/ and the
//! other READMEs (deploy/ included), by GitHub's anchor rules. README's first screen.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, StatusCode};
use oauth_apps_gateway::config::Config;
use support::{
    CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic, basic_auth, call, get, http1_client,
    upstream_answering,
};

const PREFIX: &str = "oauth_apps_gateway_";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// README.md, SECURITY.md and docs/*.md, as paths relative to the repository root.
fn markdown_files() -> Vec<String> {
    let mut files = vec!["README.md".to_owned(), "SECURITY.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| {
            e.expect("docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

// ---------------------------------------------------------------------------------------------
// Markdown: just enough of it to read headings, tables and links outside code blocks.

/// The lines of `text` outside fenced code blocks, numbered from 1.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The cells of a table row, split on `|` outside code spans (`` `a|b` `` is one cell).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let (mut cells, mut cell, mut code) = (Vec::new(), String::new(), false);
    for c in inner.chars() {
        match c {
            '`' => {
                code = !code;
                cell.push(c);
            }
            '|' if !code => cells.push(std::mem::take(&mut cell).trim().to_owned()),
            _ => cell.push(c),
        }
    }
    cells.push(cell.trim().to_owned());
    cells
}

/// The code spans of a cell, in order: `` `a`, `b` `` gives `["a", "b"]`.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// One table: the heading it is under, its header cells and its rows (cells, line number).
struct Table {
    heading: String,
    header: Vec<String>,
    rows: Vec<(Vec<String>, usize)>,
}

impl Table {
    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
}

fn tables(text: &str) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    let mut heading = String::new();
    let mut in_table = false;
    for (n, line) in prose_lines(text) {
        if let Some(h) = heading_text(line) {
            heading = h.to_owned();
        }
        if !line.trim_start().starts_with('|') {
            in_table = false;
            continue;
        }
        let row = cells(line);
        if !in_table {
            in_table = true;
            out.push(Table {
                heading: heading.clone(),
                header: row,
                rows: Vec::new(),
            });
        } else if !row.iter().all(|c| c.chars().all(|c| c == '-' || c == ':')) {
            out.last_mut().expect("table").rows.push((row, n));
        }
    }
    out
}

/// The text of an ATX heading line, without its `#`s.
fn heading_text(line: &str) -> Option<&str> {
    let hashes = line.len() - line.trim_start_matches('#').len();
    (1..=6)
        .contains(&hashes)
        .then(|| line[hashes..].strip_prefix(' '))?
}

/// GitHub's anchor for a heading: the rendered text lowercased, every character but letters,
/// digits, `-`, `_` and spaces dropped, spaces made `-`.
fn slug(heading: &str) -> String {
    // Rendered text: links keep their text, code spans lose their backticks.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor of a Markdown file, duplicates numbered as GitHub does (`x`, `x-1`, `x-2`).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(h) = heading_text(line) else {
            continue;
        };
        let base = slug(h.trim());
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// `line` without its code spans, so that a `](x)` inside backticks is not taken for a link.
fn without_code_spans(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Links

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    let mut files = markdown_files();
    files.extend(
        [
            "bench/README.md",
            "tests/legacy-client/README.md",
            "deploy/README.md",
        ]
        .map(String::from),
    );
    for file in files {
        let text = read(&file);
        let dir = Path::new(&file).parent().unwrap_or(Path::new(""));
        for (n, line) in prose_lines(&text) {
            let line = without_code_spans(line);
            for part in line.split("](").skip(1) {
                let Some(end) = part.find(')') else {
                    continue;
                };
                let target = &part[..end];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target, None),
                };
                let resolved = if path.is_empty() {
                    PathBuf::from(&file)
                } else {
                    normalize(&dir.join(path))
                };
                let full = root().join(&resolved);
                if !full.exists() {
                    broken.push(format!(
                        "{file}:{n}: {target}: no such file {}",
                        resolved.display()
                    ));
                    continue;
                }
                if let Some(anchor) = anchor {
                    let in_md = resolved.extension().is_some_and(|e| e == "md");
                    let known = in_md
                        && anchors(&std::fs::read_to_string(&full).expect("read")).contains(anchor);
                    if !known {
                        broken.push(format!("{file}:{n}: {target}: no heading #{anchor}"));
                    }
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `docs/../README.md` as `README.md`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn github_anchor_rules() {
    for (heading, anchor) in [
        ("`[server]`", "server"),
        ("`[[migration.brownouts]]`", "migrationbrownouts"),
        ("`[failed_checks]`", "failed_checks"),
        ("Step 1: observe", "step-1-observe"),
        (
            "Never retried (but a bodiless GET or HEAD, once)",
            "never-retried-but-a-bodiless-get-or-head-once",
        ),
        ("The gateway's own errors", "the-gateways-own-errors"),
        (
            "Keys, quotas and verified credentials",
            "keys-quotas-and-verified-credentials",
        ),
        ("See [the mapping](x.md#y)", "see-the-mapping"),
    ] {
        assert_eq!(slug(heading), anchor, "{heading}");
    }
    let dup = anchors("# A\n## A\n```\n# not a heading\n```\n### A\n");
    assert_eq!(dup, ["a", "a-1", "a-2"].map(String::from).into());
}

// ---------------------------------------------------------------------------------------------
// README's first screen

#[test]
fn readme_is_a_front_door() {
    let readme = read("README.md");
    assert!(
        readme.len() <= 10 * 1024,
        "README.md is {} bytes: the reference belongs in docs/",
        readme.len()
    );
    let first_screen: String = readme.lines().take(40).collect::<Vec<_>>().join("\n");
    for command in [
        "cargo run --release -- --config config.toml",
        "cargo test --locked",
    ] {
        assert!(
            first_screen.contains(command),
            "{command:?} is not in README's first 40 lines"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// What the loader accepts, learnt from the loader itself: an unknown key is refused with the
/// list of the keys that are known (serde's `deny_unknown_fields`). Returns dotted keys
/// (`server.listen`, `migration.brownouts.start`), the tables among them (`migration.operations`,
/// `migration.brownouts`), and the keys of earlier releases that are read only to be refused.
fn accepted_keys() -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    fn known_fields(text: &str) -> Option<Vec<String>> {
        let err = Config::from_toml_str(text).err()?.to_string();
        // serde: "unknown field `x`, expected one of `a`, `b`" (or "expected `a`" for one).
        let list = err.split("unknown field `zz_probe`, expected ").nth(1)?;
        let list = list.split(" (line").next()?;
        Some(code_spans(list).into_iter().map(str::to_owned).collect())
    }
    let probe = "zz_probe = 1\n";
    let sections = known_fields(probe).expect("an unknown top-level key lists the sections");
    let (mut keys, mut tables, mut replaced) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for section in sections {
        let fields = known_fields(&format!("[{section}]\n{probe}"))
            .unwrap_or_else(|| panic!("[{section}] lists its keys"));
        for field in fields {
            let dotted = format!("{section}.{field}");
            let nested = known_fields(&format!("[{dotted}]\n{probe}"))
                .or_else(|| known_fields(&format!("[[{dotted}]]\n{probe}")));
            if let Some(sub) = nested {
                keys.extend(sub.iter().map(|k| format!("{dotted}.{k}")));
                tables.insert(dotted);
                continue;
            }
            let refused = Config::from_toml_str(&format!("[{section}]\n{field} = 1\n"))
                .err()
                .is_some_and(|e| e.to_string().contains("is no longer read"));
            if refused {
                replaced.insert(dotted);
            } else {
                keys.insert(dotted);
            }
        }
    }
    (keys, tables, replaced)
}

/// A key's documented default: a value (TOML), or words.
#[derive(Debug)]
enum Documented {
    Value(toml::Value),
    Words(String),
}

/// A cell's leading code span as a TOML value; a bare `10s` or `16 MiB`-free word is a string.
fn default_of(cell: &str) -> Documented {
    if !cell.starts_with('`') {
        return Documented::Words(cell.to_owned());
    }
    let literal = code_spans(cell)[0];
    Documented::Value(toml_value(literal))
}

fn toml_value(literal: &str) -> toml::Value {
    match format!("v = {literal}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("v"),
        Err(_) => toml::Value::String(literal.to_owned()),
    }
}

/// The text that sets `key` (dotted) to `value`, and the text it must load the same as.
fn set_and_base(key: &str, value: &toml::Value) -> (String, String) {
    let (table, field) = key.rsplit_once('.').expect("dotted key");
    if table == "migration.brownouts" {
        let base = "[[migration.brownouts]]\nstart = \"2027-03-01T14:00:00Z\"\nend = \"2027-03-01T17:00:00Z\"\n";
        (format!("{base}{field} = {value}\n"), base.to_owned())
    } else {
        (format!("[{table}]\n{field} = {value}\n"), String::new())
    }
}

/// `key` (dotted) in config.toml, when the file states it.
fn in_config_toml<'a>(file: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let field = parts.pop()?;
    let mut table = file;
    for p in parts {
        table = table.get(p)?.as_table()?;
    }
    table.get(field)
}

/// Checks one documented default: setting the key to it loads, to what the key's absence loads
/// (the loader's default); and config.toml, where it states the key, states the same value.
fn check_default(
    key: &str,
    default: &Documented,
    config_toml: &toml::Table,
    problems: &mut Vec<String>,
) {
    let stated = in_config_toml(config_toml, key);
    match default {
        Documented::Value(value) => {
            let (text, base) = set_and_base(key, value);
            let base = Config::from_toml_str(&base).expect("base config");
            match Config::from_toml_str(&text) {
                Err(e) => problems.push(format!("{key} = {value}: does not load: {e}")),
                Ok(c) if format!("{c:?}") != format!("{base:?}") => problems.push(format!(
                    "{key} = {value} is documented as the default, but the loader's default differs"
                )),
                Ok(_) => {}
            }
            if let Some(s) = stated.filter(|s| *s != value) {
                problems.push(format!(
                    "{key}: documented default {value}, config.toml says {s}"
                ));
            }
        }
        Documented::Words(words) => {
            if let Some(s) = stated {
                problems.push(format!(
                    "{key}: documented default \"{words}\", but config.toml sets it to {s}"
                ));
            }
        }
    }
}

/// The reference tables of docs/configuration.md: dotted key -> (default, line).
fn documented_config() -> BTreeMap<String, (Documented, usize)> {
    let text = read("docs/configuration.md");
    let mut out = BTreeMap::new();
    for table in tables(&text) {
        let (Some(key_col), Some(default_col)) = (table.column("key"), table.column("default"))
        else {
            continue;
        };
        let heading = table.heading.trim();
        let section = code_spans(heading)
            .first()
            .map(|s| s.trim_matches(|c| c == '[' || c == ']'))
            .unwrap_or_else(|| panic!("table under {heading:?} names no [section]"));
        for (row, n) in &table.rows {
            for key in code_spans(&row[key_col]) {
                let dotted = format!("{section}.{key}");
                let previous = out.insert(dotted.clone(), (default_of(&row[default_col]), *n));
                assert!(previous.is_none(), "{dotted} documented twice");
            }
        }
    }
    out
}

#[test]
fn the_configuration_reference_matches_the_loader_and_config_toml() {
    let (accepted, tables, replaced) = accepted_keys();
    assert!(accepted.contains("server.listen") && accepted.contains("migration.brownouts.end"));
    assert!(tables.contains("migration.operations") && tables.contains("migration.brownouts"));
    let documented = documented_config();
    let config_toml: toml::Table = read("config.toml").parse().expect("config.toml is TOML");
    let mut problems = Vec::new();
    for (key, (default, n)) in &documented {
        if !accepted.contains(key) {
            problems.push(format!(
                "docs/configuration.md:{n}: {key} is not a key the loader accepts"
            ));
            continue;
        }
        check_default(key, default, &config_toml, &mut problems);
    }
    for key in accepted.difference(&documented.keys().cloned().collect()) {
        problems.push(format!(
            "{key} is accepted by the loader but not in a table of docs/configuration.md"
        ));
    }
    // Keys of earlier releases are named, with their replacement, where the section is.
    let text = read("docs/configuration.md");
    for key in &replaced {
        let field = key.rsplit('.').next().expect("field");
        if !text.contains(&format!("`{field}`")) {
            problems.push(format!(
                "{key} (refused, replaced) is not named in the docs"
            ));
        }
    }
    assert!(
        documented.len() > 40,
        "only {} keys parsed",
        documented.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// SECURITY.md's "Limits and their defaults" names keys and defaults too.
#[test]
fn security_md_limits_match_the_loader() {
    let (accepted, _, _) = accepted_keys();
    let config_toml: toml::Table = read("config.toml").parse().expect("config.toml is TOML");
    let text = read("SECURITY.md");
    let table = tables(&text)
        .into_iter()
        .find(|t| t.heading == "Limits and their defaults")
        .expect("SECURITY.md has a limits table");
    let (key_col, default_col) = (
        table.column("key").expect("key column"),
        table.column("default").expect("default column"),
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for (row, n) in &table.rows {
        let keys = code_spans(&row[key_col]);
        let Some(first) = keys.first() else {
            continue; // "fixed": not a key
        };
        let (section, _) = first
            .rsplit_once('.')
            .unwrap_or_else(|| panic!("SECURITY.md:{n}: {first} is not a dotted key"));
        let values = code_spans(&row[default_col]);
        for (i, key) in keys.iter().enumerate() {
            let dotted = if key.contains('.') {
                (*key).to_owned()
            } else {
                format!("{section}.{key}")
            };
            if !accepted.contains(&dotted) {
                problems.push(format!(
                    "SECURITY.md:{n}: {dotted} is not a key the loader accepts"
                ));
                continue;
            }
            let value = if values.len() == keys.len() {
                values[i]
            } else {
                values[0]
            };
            check_default(
                &dotted,
                &Documented::Value(toml_value(value)),
                &config_toml,
                &mut problems,
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} limits parsed");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Every `oauth_apps_gateway_…` name in `text`, with its line number.
fn metric_names(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(at) = line[from..].find(PREFIX) {
            let start = from + at;
            let before = line[..start].chars().next_back();
            let end = line[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(line.len(), |e| start + e);
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.push((line[start..end].to_owned(), i + 1));
            }
            from = end;
        }
    }
    out
}

/// README.md, docs/*.md, and every .yml, .yaml and .json file under deploy/.
fn files_naming_metrics() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p
                .extension()
                .is_some_and(|x| x == "yml" || x == "yaml" || x == "json")
            {
                out.push(p);
            }
        }
    }
    let mut deploy = Vec::new();
    walk(&root().join("deploy"), &mut deploy);
    let mut files: Vec<String> = markdown_files()
        .into_iter()
        .filter(|f| f != "SECURITY.md")
        .collect();
    files.extend(deploy.iter().map(|p| {
        p.strip_prefix(root())
            .expect("under the root")
            .display()
            .to_string()
    }));
    files.sort();
    files
}

/// The families of a scrape: name -> type, from its `# TYPE` lines.
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// Whether a name written in the docs is in the scrape: a family, a histogram's `_bucket`,
/// `_sum` or `_count` series, or, for a name ending in `_` (a prefix, as in a `grep`), the start
/// of one.
fn is_scraped(name: &str, families: &BTreeMap<String, String>) -> bool {
    if name.ends_with('_') {
        return families.keys().any(|f| f.starts_with(name));
    }
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kind == "histogram")
    })
}

/// The first cells of the tables of docs/metrics.md whose first column is `metric`.
fn documented_families() -> BTreeSet<String> {
    tables(&read("docs/metrics.md"))
        .into_iter()
        .filter(|t| t.column("metric") == Some(0))
        .flat_map(|t| t.rows)
        .flat_map(|(row, _)| {
            code_spans(&row[0])
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Writes the gateway's config file: an upstream and sections of its own.
fn write_config(path: &Path, upstream: &str, extra: &str) {
    std::fs::write(path, format!("[upstream]\nurl = {upstream:?}\n{extra}")).expect("write");
}

async fn reload(gw: &Gateway) -> StatusCode {
    let url = format!("{}/reload", gw.admin_url());
    call(&http1_client(), Method::POST, &url, &[], Bytes::new())
        .await
        .status
}

/// A call with the app's Basic credentials; returns the status.
async fn app_call(method: Method, url: &str, body: &str) -> StatusCode {
    let auth = basic_auth();
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    call(&http1_client(), method, url, &headers, body.to_owned())
        .await
        .status
}

/// Runs traffic of every kind through an in-process gateway in front of the fake GitHub (each
/// legacy operation rewritten, observed, rejected, in a brownout, malformed and limited; the
/// token API; pass-through; query credentials; status compatibility; a reload that succeeds and
/// one that fails; an upstream failure) and returns the scrape of its admin `/metrics`.
async fn scrape_after_every_kind_of_traffic() -> String {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = |user: &str| gh.issue_token(CLIENT_ID, user);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    write_config(
        &path,
        &gh.url(),
        "[migration.operations]\nrevoke_all = \"observe\"\n[failed_checks]\ncredential_burst = 1\n",
    );
    let gw = Gateway::start_from_file(&path).await;
    let app = format!("{}/applications/{CLIENT_ID}", gw.url());

    // Rewritten: every legacy operation; observed: revoke_all.
    let checked = token("octocat");
    let expect = [
        (
            Method::GET,
            format!("{app}/tokens/{checked}"),
            StatusCode::OK,
        ),
        (
            Method::HEAD,
            format!("{app}/tokens/{checked}"),
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("{app}/tokens/{}", token("reset")),
            StatusCode::OK,
        ),
        (
            Method::DELETE,
            format!("{app}/tokens/{}", token("revoke")),
            StatusCode::NO_CONTENT,
        ),
        (
            Method::DELETE,
            format!("{app}/tokens"),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            format!("{app}/tokens/"),
            StatusCode::BAD_REQUEST,
        ),
        (Method::GET, format!("{}/echo", gw.url()), StatusCode::OK),
    ];
    for (method, url, status) in expect {
        assert_eq!(
            app_call(method.clone(), &url, "").await,
            status,
            "{method} {url}"
        );
    }
    // The token API, directly.
    let body = format!("{{\"access_token\":\"{checked}\"}}");
    assert_eq!(
        app_call(Method::POST, &format!("{app}/token"), &body).await,
        StatusCode::OK
    );
    assert_eq!(
        app_call(Method::POST, &format!("{app}/token/scoped"), &body).await,
        StatusCode::OK
    );
    // revoke_grant as @octokit/rest 16 sends it: credentials in the query.
    let grant = format!(
        "{app}/grants/{}?client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}",
        token("grant")
    );
    let a = call(&http1_client(), Method::DELETE, &grant, &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    // A wrong secret spends its quota of one: 401, then 429 (limited).
    let wrong = basic(CLIENT_ID, "wrong");
    for status in [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS] {
        let url = format!("{app}/tokens/{checked}");
        let a = call(
            &http1_client(),
            Method::GET,
            &url,
            &[("authorization", &wrong)],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, status);
    }

    // Reload: an upstream answering 422 (status compatibility), reset rejected, revoke_token in a
    // brownout.
    let unprocessable = upstream_answering(422, std::time::Duration::ZERO).await;
    write_config(
        &path,
        &unprocessable,
        "[migration.operations]\nreset = \"reject\"\n\
         [[migration.brownouts]]\nstart = \"2000-01-01T00:00:00Z\"\nend = \"2999-01-01T00:00:00Z\"\n\
         operations = [\"revoke_token\"]\n",
    );
    assert_eq!(reload(&gw).await, StatusCode::OK);
    for (method, status) in [
        (Method::GET, StatusCode::NOT_FOUND),
        (Method::POST, StatusCode::GONE),
        (Method::DELETE, StatusCode::GONE),
    ] {
        let url = format!("{app}/tokens/{checked}");
        assert_eq!(app_call(method.clone(), &url, "").await, status, "{method}");
    }

    // A reload that fails, then an upstream that refuses connections: 502.
    std::fs::write(&path, "[server]\nlisten = \"nonsense\"\n").expect("write");
    assert_eq!(reload(&gw).await, StatusCode::UNPROCESSABLE_ENTITY);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    write_config(&path, &format!("http://{closed}"), "");
    assert_eq!(reload(&gw).await, StatusCode::OK);
    let a = get(&format!("{}/echo", gw.url())).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);

    let scrape = get(&format!("{}/metrics", gw.admin_url())).await;
    assert_eq!(scrape.status, StatusCode::OK);
    String::from_utf8(scrape.body.to_vec()).expect("UTF-8 scrape")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_metrics_are_scraped_and_scraped_metrics_documented() {
    let scrape = scrape_after_every_kind_of_traffic().await;
    let families = families(&scrape);
    // The traffic reached what it was meant to: series that only appear when used.
    for series in [
        "oauth_apps_gateway_deprecated_calls_by_client_total{client_id=\"",
        "oauth_apps_gateway_responses_total{route=\"legacy\",status=\"410\"}",
        "oauth_apps_gateway_deprecated_calls_total{action=\"brownout\",operation=\"revoke_token\"} 1",
        "oauth_apps_gateway_deprecated_calls_total{action=\"limited\",operation=\"check\"} 1",
        "oauth_apps_gateway_status_compat_rewrites_total{operation=\"check\"} 1",
        "oauth_apps_gateway_config_reloads_total{result=\"error\"} 1",
        "oauth_apps_gateway_upstream_failures_total{kind=\"connect\"} 1",
    ] {
        assert!(
            scrape.contains(series),
            "{series} not in the scrape:\n{scrape}"
        );
    }

    let mut problems = Vec::new();
    let mut names = 0;
    for file in files_naming_metrics() {
        for (name, n) in metric_names(&read(&file)) {
            names += 1;
            if !is_scraped(&name, &families) {
                problems.push(format!(
                    "{file}:{n}: {name} is not in a scrape of the gateway"
                ));
            }
        }
    }
    assert!(names > 50, "only {names} metric names found in the docs");

    let documented = documented_families();
    for family in families.keys() {
        if !documented.contains(family) {
            problems.push(format!(
                "{family} is scraped but not in a table of docs/metrics.md"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn metric_names_are_recognised_by_their_prefix() {
    let names: Vec<String> = metric_names(
        "rate(oauth_apps_gateway_a_total[5m]) x_oauth_apps_gateway_b `oauth_apps_gateway_c_bucket`\n\
         grep '^oauth_apps_gateway_d_' oauth_apps_gateway::access",
    )
    .into_iter()
    .map(|(n, _)| n)
    .collect();
    assert_eq!(
        names,
        [
            "oauth_apps_gateway_a_total",
            "oauth_apps_gateway_c_bucket",
            "oauth_apps_gateway_d_"
        ]
    );
    let families: BTreeMap<String, String> = [
        ("oauth_apps_gateway_h_seconds", "histogram"),
        ("oauth_apps_gateway_c", "counter"),
        ("oauth_apps_gateway_d_x", "gauge"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .into();
    assert!(is_scraped("oauth_apps_gateway_h_seconds_bucket", &families));
    assert!(is_scraped("oauth_apps_gateway_h_seconds_count", &families));
    assert!(!is_scraped("oauth_apps_gateway_c_count", &families));
    assert!(is_scraped("oauth_apps_gateway_d_", &families));
    assert!(!is_scraped("oauth_apps_gateway_e_", &families));
    assert!(!is_scraped("oauth_apps_gateway_d", &families));
}
