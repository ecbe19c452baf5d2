//! `docs/configuration.md` against the code: the keys in its tables are exactly the keys
//! the configuration accepts, and the `IM_*` variables it names are exactly the ones the
//! command line defines. Plain Rust: no emulator needed.
//!
//! Keys come from two places, so that neither a key without a default value nor an
//! optional one escapes: a configuration with every optional section present, serialized
//! (the keys it prints), and, for each table of it, the list of fields serde names when it
//! refuses an unknown key (every configuration struct denies unknown fields).

use std::collections::BTreeSet;
use std::path::Path;

use instance_manager::config::Config;

/// Every optional section set, so that the serialized form shows each table.
const SAMPLE: &str = r#"
metrics_listen = "127.0.0.1:9090"
aws_endpoint = "http://127.0.0.1:4566"
aws_region = "us-east-1"

[auth]
disabled = false

[[auth.tokens]]
name = "ci"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
role = "admin"
tenant = "acme"

[auth.jwt]
issuer = "https://issuer.example"
audience = "client"
jwks_url = "https://issuer.example/.well-known/jwks.json"
jwks_file = "/tmp/jwks.json"

[tls]
cert_file = "/tmp/cert.pem"
key_file = "/tmp/key.pem"
client_ca_file = "/tmp/ca.pem"

[[environments]]
name = "DEV"
account_id = "111111111111"
region = "us-east-1"
role_arn = "arn:aws:iam::111111111111:role/x"
external_id = "x"
endpoint = "http://127.0.0.1:4566"

[environments.scale_bounds]
min = 1
max = 3

[environments.platform]
min_healthy_targets = 1
deregistration_delay_secs = 30

[[environments.platform.load_balancers]]
name = "alb-1"
listener_arn = "arn:aws:elasticloadbalancing:us-east-1:111111111111:listener/app/a/1/2"
max_rules = 10

[[environments.platform.managed_zones]]
domain = "customers.example"
hosted_zone_id = "Z1"
"#;

/// Flattens a TOML value into dotted keys; an array of tables is `name[]`.
fn flatten(
    prefix: &str,
    value: &toml::Value,
    keys: &mut BTreeSet<String>,
    tables: &mut Vec<String>,
) {
    match value {
        toml::Value::Table(table) => {
            tables.push(prefix.to_owned());
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, keys, tables);
            }
        }
        toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
            for item in items {
                flatten(&format!("{prefix}[]"), item, keys, tables);
            }
        }
        _ => {
            keys.insert(prefix.to_owned());
        }
    }
}

/// The table at `path` (`a.b[]` takes the first element of the array `b`).
fn table_at<'a>(root: &'a mut toml::Table, path: &str) -> &'a mut toml::Table {
    let mut table = root;
    if path.is_empty() {
        return table;
    }
    for segment in path.split('.') {
        let (name, first) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (segment, false),
        };
        let value = table.get_mut(name).expect("path from the sample");
        let value = if first {
            value
                .as_array_mut()
                .and_then(|a| a.first_mut())
                .expect("array")
        } else {
            value
        };
        table = value.as_table_mut().expect("a table");
    }
    table
}

/// The fields serde lists when the table at `path` gets a key it does not know; empty for
/// a table that ignores unknown keys (its keys all serialize, none is optional).
fn declared_fields(sample: &toml::Table, path: &str) -> Vec<String> {
    let mut probe = sample.clone();
    table_at(&mut probe, path).insert("zz_not_a_key".into(), toml::Value::Boolean(true));
    let text = toml::to_string(&probe).expect("serialize probe");
    let Err(error) = toml::from_str::<Config>(&text) else {
        return Vec::new();
    };
    let error = error.to_string();
    let listed = error
        .split("expected one of ")
        .nth(1)
        .or_else(|| error.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no field list in: {error}"));
    let listed = listed.lines().next().unwrap_or_default();
    listed
        .split(',')
        .filter_map(|field| {
            let field = field.trim().trim_start_matches("or ").trim();
            field
                .strip_prefix('`')
                .and_then(|f| f.split('`').next())
                .map(str::to_owned)
        })
        .collect()
}

/// Every configuration key, dotted (`environments[].platform.cluster`).
fn code_keys() -> BTreeSet<String> {
    let config: Config = toml::from_str(SAMPLE).expect("the sample is a valid configuration");
    let sample = toml::Table::try_from(&config).expect("serialize");
    let mut keys = BTreeSet::new();
    let mut tables = Vec::new();
    flatten(
        "",
        &toml::Value::Table(sample.clone()),
        &mut keys,
        &mut tables,
    );
    let tables: BTreeSet<String> = tables.into_iter().collect();
    for table in &tables {
        for field in declared_fields(&sample, table) {
            let path = if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            };
            // A field that is itself a table is described by its keys.
            if !tables.contains(&path) && !tables.contains(&format!("{path}[]")) {
                keys.insert(path);
            }
        }
    }
    keys
}

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cells of a Markdown table row (`\|` is a pipe inside a cell).
fn cells(row: &str) -> Vec<String> {
    let row = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_owned()).collect()
}

/// (key, environment cell) of each row of the key tables.
fn doc_rows(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter(|line| line.starts_with("| `"))
        .map(cells)
        .filter_map(|cells| {
            let key = cells[0].strip_prefix('`')?.strip_suffix('`')?.to_owned();
            (!key.starts_with("IM_")).then(|| (key, cells.get(3).cloned().unwrap_or_default()))
        })
        .collect()
}

/// Every `IM_*` name in a text.
fn im_variables(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("IM_") && word.len() > 3)
        .map(str::to_owned)
        .collect()
}

/// (variable, long flag) of every argument of every subcommand.
fn clap_variables() -> Vec<(String, String)> {
    fn walk(command: &clap::Command, out: &mut Vec<(String, String)>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.push((
                    env.to_string_lossy().into_owned(),
                    arg.get_long().unwrap_or_default().to_owned(),
                ));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&instance_manager::cli::command(), &mut out);
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let code = code_keys();
    let rows = doc_rows(&doc());
    let documented: BTreeSet<String> = rows.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(rows.len(), documented.len(), "a key is documented twice");
    let missing: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/configuration.md and the configuration differ\n  not documented: {missing:?}\n  documented but not a key: {unknown:?}"
    );
    // The probe found the keys that the serialized sample omits (sanity of the method).
    for key in [
        "tls.client_ca_file",
        "environments[].platform.cluster",
        "listen",
    ] {
        assert!(code.contains(key), "{key} not found in the code's keys");
    }
}

#[test]
fn documented_variables_are_the_command_lines() {
    let doc = doc();
    let clap = clap_variables();
    let defined: BTreeSet<String> = clap.iter().map(|(env, _)| env.clone()).collect();
    let documented = im_variables(&doc);
    let undocumented: Vec<_> = defined.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "IM_* variables the command line defines but docs/configuration.md does not name: {undocumented:?}"
    );
    // The bootstrap's MySQL flags exist only with the emulator feature.
    let unknown: Vec<_> = documented
        .difference(&defined)
        .filter(|env| cfg!(feature = "emulator") || !env.starts_with("IM_MYSQL_"))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md names IM_* variables the command line does not define: {unknown:?}"
    );
    // A key's variable sets that key: its flag is the key's name, or the row says which.
    for (key, cell) in doc_rows(&doc) {
        let Some(env) = im_variables(&cell).into_iter().next() else {
            continue;
        };
        let (_, long) = clap
            .iter()
            .find(|(name, _)| *name == env)
            .unwrap_or_else(|| panic!("{key}: {env} is not a command-line variable"));
        let leaf = key.rsplit('.').next().unwrap_or_default().replace('_', "-");
        assert!(
            *long == leaf || cell.contains(&format!("`--{long}`")),
            "{key}: {env} is the variable of --{long}; name the flag in the row if that is right"
        );
    }
}
