//! The IAM policies under `deploy/iam/` grant exactly the AWS actions the code calls.
//!
//! The scanner reads the production source (everything under `src/` except what only the
//! `emulator` feature or `#[cfg(test)]` compiles), finds each SDK fluent call
//! (`client.describe_services()…send()`), names its IAM action from the `aws_sdk_*` crate
//! the file uses, adds the actions AWS authorises implicitly (tag-on-create, PassRole, the
//! RDS IAM login, AssumeRole through the credentials provider), and compares that set with
//! the policies' actions both ways. Plain Rust: no emulator needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Actions granted ahead of the code that calls them (a policy may be written before the
/// adapter lands); the test fails while an entry here is also called, so it cannot go
/// stale.
const PENDING: &[&str] = &[];

/// Calls that IAM never authorises: no policy may (or needs to) grant them.
const NO_PERMISSION_NEEDED: &[&str] = &[
    // "No permissions are required to perform this operation" (STS API reference).
    "sts:GetCallerIdentity",
];

/// Services whose calls use the control plane's own credentials; every other service is
/// called inside an environment, with its assumed role.
const CONTROL_PLANE_SERVICES: &[&str] = &["dynamodb", "sts"];

/// The IAM service prefix of each SDK crate the production code may use.
const SERVICE_PREFIXES: &[(&str, &str)] = &[
    ("aws_sdk_acm", "acm"),
    ("aws_sdk_cloudwatch", "cloudwatch"),
    ("aws_sdk_cloudwatchlogs", "logs"),
    ("aws_sdk_cognitoidentityprovider", "cognito-idp"),
    ("aws_sdk_dynamodb", "dynamodb"),
    ("aws_sdk_ecs", "ecs"),
    ("aws_sdk_efs", "elasticfilesystem"),
    ("aws_sdk_elasticloadbalancingv2", "elasticloadbalancing"),
    ("aws_sdk_iam", "iam"),
    ("aws_sdk_rds", "rds"),
    ("aws_sdk_route53", "route53"),
    ("aws_sdk_s3", "s3"),
    ("aws_sdk_secretsmanager", "secretsmanager"),
    ("aws_sdk_sts", "sts"),
];

/// Operations whose IAM action is not their own name.
const RENAMED: &[(&str, &str, &str)] = &[
    ("s3", "list_objects_v2", "ListBucket"),
    ("s3", "head_object", "GetObject"),
    ("s3", "create_multipart_upload", "PutObject"),
    ("s3", "upload_part", "PutObject"),
    ("s3", "complete_multipart_upload", "PutObject"),
    ("s3", "delete_objects", "DeleteObject"),
    ("rds", "describe_db_instances", "DescribeDBInstances"),
];

/// Actions AWS authorises besides the call's own: (service, text in the file, action).
const IMPLIED: &[(&str, &str, &str)] = &[
    // Tag-on-create: tags in a create call are authorised as a tagging action too.
    ("ecs", ".set_tags(", "ecs:TagResource"),
    (
        "elasticloadbalancing",
        ".set_tags(",
        "elasticloadbalancing:AddTags",
    ),
    (
        "elasticfilesystem",
        ".set_tags(",
        "elasticfilesystem:TagResource",
    ),
    ("secretsmanager", ".set_tags(", "secretsmanager:TagResource"),
    ("iam", ".set_tags(", "iam:TagRole"),
    // RequestCertificate with tags also needs acm:AddTagsToCertificate (ACM user guide,
    // "Tag-based IAM policies").
    ("acm", ".set_tags(", "acm:AddTagsToCertificate"),
    ("s3", ".set_tagging(", "s3:PutObjectTagging"),
    // A task definition naming roles passes them to ECS.
    ("ecs", "execution_role_arn(", "iam:PassRole"),
    ("ecs", "task_role_arn(", "iam:PassRole"),
    // A presigned token is the password of an RDS IAM login.
    ("rds", "AuthTokenGenerator", "rds-db:connect"),
    // aws-config's provider calls sts:AssumeRole for each environment's role.
    ("sts", "AssumeRoleProvider", "sts:AssumeRole"),
];

/// Blanks comments and the contents of string and character literals (newlines kept, byte
/// offsets unchanged), so that neither can look like a call.
fn blank_comments_and_literals(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| {
        if c == '\n' {
            "\n".to_owned()
        } else {
            " ".repeat(c.len_utf8())
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push_str(&blank(chars[i]));
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push_str(&blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"') | Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            // Keep `r##"` and the closing `"##`, blank what is between.
            for &kept in &chars[i..=j] {
                out.push(kept);
            }
            j += 1;
            let closing: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while j < chars.len() && !chars[j..].starts_with(&closing) {
                out.push_str(&blank(chars[j]));
                j += 1;
            }
            for &kept in chars[j..].iter().take(closing.len()) {
                out.push(kept);
            }
            i = j + closing.len();
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push_str(&blank(chars[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A character literal ('"', '\'', '\n'); otherwise a lifetime.
            out.push('\'');
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push_str(&blank(chars[i]));
                    i += 1;
                }
            }
            out.push('\'');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// What one source file contributes once test-only and emulator-only items are cut out.
#[derive(Debug, Default)]
struct Scanned {
    /// The `aws_sdk_*` crates named in the compiled code.
    crates: BTreeSet<String>,
    /// SDK operations called, snake_case, in order of appearance.
    operations: Vec<String>,
    /// How many `.send()` the file has: each must belong to one operation found.
    sends: usize,
    /// Modules declared `#[cfg(feature = "emulator")] mod x;` or `#[cfg(test)] mod x;`,
    /// whose files are not production code.
    excluded_modules: Vec<String>,
    /// The compiled text (comments and literal contents blanked), for [`IMPLIED`].
    text: String,
}

/// Removes every item under `#[cfg(test)]` or `#[cfg(feature = "emulator")]` from `text`
/// (`source` blanked): from the attribute to the end of the item (its matching `}` or its
/// `;`). Gates are found in `source` (the feature's name is a literal) where `text` shows
/// code, not a comment.
fn cut_gated_items(source: &str, text: &str, excluded_modules: &mut Vec<String>) -> String {
    const GATES: &[&str] = &["#[cfg(test)]", "#[cfg(feature = \"emulator\")]"];
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    loop {
        let next = GATES
            .iter()
            .flat_map(|g| {
                source[from..]
                    .match_indices(g)
                    .map(move |(at, _)| (from + at, g.len()))
            })
            .filter(|(at, _)| text[*at..].starts_with("#[cfg("))
            .min();
        let Some((at, len)) = next else {
            out.push_str(&text[from..]);
            return out;
        };
        out.push_str(&text[from..at]);
        let item = &text[at + len..];
        let brace = item.find('{');
        let semicolon = item.find(';');
        let end = match (brace, semicolon) {
            (Some(b), Some(s)) if s < b => s + 1,
            (None, Some(s)) => s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (k, ch) in item[b..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => item.len(),
        };
        let gated = &item[..end];
        let words: Vec<&str> = gated
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        if gated.trim_end().ends_with(';')
            && let Some(pos) = words.iter().position(|w| *w == "mod")
            && let Some(name) = words.get(pos + 1)
        {
            excluded_modules.push((*name).to_owned());
        }
        from = at + len + end;
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Scans one file's source.
fn scan(source: &str) -> Scanned {
    let mut scanned = Scanned::default();
    let blanked = blank_comments_and_literals(source);
    let text = cut_gated_items(source, &blanked, &mut scanned.excluded_modules);
    for (at, _) in text.match_indices("aws_sdk_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| is_ident_char(*c))
            .collect();
        scanned.crates.insert(name);
    }
    scanned.sends = text.matches(".send()").count();
    // `receiver.operation()`: an SDK client is named `client`, `…_client` or after its
    // service (`sts`); each operation's fluent builder takes no argument.
    let compact: String = text.split_whitespace().collect::<Vec<_>>().join("");
    for (dot, _) in compact.match_indices('.') {
        let before = &compact[..dot];
        let receiver: String = before
            .chars()
            .rev()
            .take_while(|c| is_ident_char(*c))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !(receiver == "client" || receiver.ends_with("_client") || receiver == "sts") {
            continue;
        }
        let after = &compact[dot + 1..];
        let name: String = after.chars().take_while(|c| is_ident_char(*c)).collect();
        if name.is_empty() || !after[name.len()..].starts_with("()") || name == "clone" {
            continue;
        }
        scanned.operations.push(name);
    }
    scanned.text = text;
    scanned
}

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The IAM action of `operation` of the service with IAM prefix `service`.
fn action(service: &str, operation: &str) -> String {
    let name = RENAMED
        .iter()
        .find(|(s, op, _)| *s == service && *op == operation)
        .map(|(_, _, name)| (*name).to_owned())
        .unwrap_or_else(|| pascal(operation));
    format!("{service}:{name}")
}

/// The actions one scanned file calls, or why they cannot be told.
fn file_actions(path: &str, scanned: &Scanned) -> Result<BTreeSet<String>, String> {
    let services: Vec<&str> = scanned
        .crates
        .iter()
        .filter_map(|krate| {
            SERVICE_PREFIXES
                .iter()
                .find(|(name, _)| name == krate)
                .map(|(_, prefix)| *prefix)
        })
        .collect();
    if let Some(unknown) = scanned
        .crates
        .iter()
        .find(|k| !SERVICE_PREFIXES.iter().any(|(name, _)| name == k))
    {
        return Err(format!(
            "{path}: uses {unknown}, which SERVICE_PREFIXES does not map to an IAM prefix"
        ));
    }
    if scanned.operations.len() != scanned.sends {
        return Err(format!(
            "{path}: {} `.send()` but {} SDK calls recognised ({:?}); name the client \
             `client`, `…_client` or `sts` so the scanner sees the call",
            scanned.sends,
            scanned.operations.len(),
            scanned.operations
        ));
    }
    let mut actions = BTreeSet::new();
    if !scanned.operations.is_empty() {
        let [service] = services.as_slice() else {
            return Err(format!(
                "{path}: SDK calls in a file using {:?}: one SDK crate per file, so each call's \
                 service is known",
                scanned.crates
            ));
        };
        for operation in &scanned.operations {
            actions.insert(action(service, operation));
        }
    }
    for (service, needle, implied) in IMPLIED {
        if services.contains(service) && scanned.text.contains(needle) {
            actions.insert((*implied).to_owned());
        }
    }
    for free in NO_PERMISSION_NEEDED {
        actions.remove(*free);
    }
    Ok(actions)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The files a module declaration `mod name;` in `declaring` may refer to.
fn module_files(declaring: &Path, name: &str) -> [PathBuf; 2] {
    let stem = declaring.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let dir = if matches!(stem, "mod" | "lib" | "main") {
        declaring.parent().expect("parent").to_path_buf()
    } else {
        declaring.with_extension("")
    };
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
}

/// Every action the production code calls, per file.
fn called_actions() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let scanned: Vec<(PathBuf, Scanned)> = files
        .into_iter()
        .map(|path| {
            let source = std::fs::read_to_string(&path).expect("read source");
            let scanned = scan(&source);
            (path, scanned)
        })
        .collect();
    let mut excluded: BTreeSet<PathBuf> = BTreeSet::new();
    for (path, s) in &scanned {
        for module in &s.excluded_modules {
            excluded.extend(module_files(path, module));
        }
    }
    // An excluded module's own submodules are excluded too.
    let excluded_dirs: Vec<PathBuf> = excluded.iter().map(|p| p.with_extension("")).collect();
    let mut errors = Vec::new();
    let mut by_file = BTreeMap::new();
    for (path, s) in &scanned {
        if excluded.contains(path) || excluded_dirs.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        let shown = path
            .strip_prefix(root)
            .unwrap_or(path)
            .display()
            .to_string();
        match file_actions(&shown, s) {
            Ok(actions) if actions.is_empty() => {}
            Ok(actions) => {
                by_file.insert(shown, actions);
            }
            Err(error) => errors.push(error),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    by_file
}

fn policy(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/iam")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items.iter().flat_map(strings).collect(),
        other => panic!("expected a string or an array of strings, got {other}"),
    }
}

/// The actions a policy allows; every statement is a plain Allow with Action and Resource.
fn policy_actions(name: &str) -> BTreeSet<String> {
    let document = policy(name);
    assert_eq!(document["Version"], "2012-10-17", "{name}: policy version");
    let statements = document["Statement"].as_array().expect("Statement array");
    let mut sids = BTreeSet::new();
    let mut actions = BTreeSet::new();
    for statement in statements {
        let sid = statement["Sid"]
            .as_str()
            .expect("every statement has a Sid");
        assert!(sids.insert(sid.to_owned()), "{name}: Sid {sid} twice");
        assert_eq!(statement["Effect"], "Allow", "{name}: {sid}");
        assert!(
            statement.get("NotAction").is_none() && statement.get("NotResource").is_none(),
            "{name}: {sid}: no NotAction/NotResource in a least-privilege policy"
        );
        assert!(
            !strings(&statement["Resource"]).is_empty(),
            "{name}: {sid}: no Resource"
        );
        for action in strings(&statement["Action"]) {
            assert!(
                !action.contains('*'),
                "{name}: {sid}: wildcard action {action}"
            );
            actions.insert(action);
        }
    }
    actions
}

fn service(action: &str) -> &str {
    action.split(':').next().unwrap_or_default()
}

fn difference(a: &BTreeSet<String>, b: &BTreeSet<String>) -> Vec<String> {
    a.difference(b).cloned().collect()
}

#[test]
fn policies_grant_exactly_what_the_code_calls() {
    let by_file = called_actions();
    let called: BTreeSet<String> = by_file.values().flatten().cloned().collect();
    let control_plane = policy_actions("control-plane-policy.json");
    let environment = policy_actions("environment-policy.json");
    let pending: BTreeSet<String> = PENDING.iter().map(|a| (*a).to_owned()).collect();

    // Where each call belongs: the control plane's own role or the environment's.
    let want_control_plane: BTreeSet<String> = called
        .iter()
        .filter(|a| CONTROL_PLANE_SERVICES.contains(&service(a)))
        .cloned()
        .collect();
    let want_environment: BTreeSet<String> =
        called.difference(&want_control_plane).cloned().collect();

    let mut problems = Vec::new();
    let mut report = |what: &str, actions: Vec<String>| {
        if !actions.is_empty() {
            problems.push(format!("{what}:\n    {}", actions.join("\n    ")));
        }
    };
    report(
        "called but not in control-plane-policy.json",
        difference(&want_control_plane, &control_plane),
    );
    report(
        "in control-plane-policy.json but not called",
        difference(&control_plane, &want_control_plane),
    );
    report(
        "called but not in environment-policy.json",
        difference(&want_environment, &environment),
    );
    let granted_not_called: BTreeSet<String> =
        environment.difference(&want_environment).cloned().collect();
    report(
        "in environment-policy.json but not called (and not PENDING)",
        difference(&granted_not_called, &pending),
    );
    report(
        "PENDING but called now: remove them from PENDING",
        pending.intersection(&called).cloned().collect(),
    );
    report(
        "PENDING but not in environment-policy.json",
        difference(&pending, &environment),
    );
    let free: BTreeSet<String> = NO_PERMISSION_NEEDED
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    report(
        "granted although IAM never checks them",
        free.intersection(&control_plane.union(&environment).cloned().collect())
            .cloned()
            .collect(),
    );
    assert!(
        problems.is_empty(),
        "IAM policies and code differ\n{}\n\ncalls per file: {by_file:#?}",
        problems.join("\n")
    );
    // The scan saw the adapters at all (a broken scanner would agree with an empty policy).
    for file in [
        "src/cloud/aws/ecs.rs",
        "src/store/dynamo/mod.rs",
        "src/cloud/accounts.rs",
    ] {
        assert!(by_file.contains_key(file), "no calls found in {file}");
    }
}

#[test]
fn every_placeholder_is_documented() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/iam");
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("deploy/iam/README.md");
    let mut missing = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/iam") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("policy");
        for piece in text.split("${").skip(1) {
            let name = piece.split('}').next().unwrap_or_default();
            if !readme.contains(&format!("`${{{name}}}`")) {
                missing.insert(name.to_owned());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "placeholders not described in deploy/iam/README.md: {missing:?}"
    );
}

#[test]
fn the_scanner_finds_calls_and_ignores_tests_emulator_code_comments_and_strings() {
    let source = r##"
use aws_sdk_s3::Client;
/// Calls `client.delete_bucket()` in a doc comment: not code.
async fn f(client: &Client) {
    let s = "client.put_bucket_policy()";
    let c = '"';
    client
        .list_objects_v2()
        .bucket("b")
        .into_paginator()
        .send();
    self.client.put_object().set_tagging(Some(t)).send().await;
    let r = r#"client.delete_bucket()"#;
    let other = client.clone();
}
#[cfg(feature = "emulator")]
fn emulated(client: &Client) { client.create_bucket().send(); }
#[cfg(feature = "emulator")]
mod platform;
#[cfg(test)]
mod tests {
    fn t(client: &Client) { client.delete_bucket().send(); }
}
"##;
    let scanned = scan(source);
    assert_eq!(scanned.operations, ["list_objects_v2", "put_object"]);
    assert_eq!(scanned.sends, 2);
    assert_eq!(scanned.excluded_modules, ["platform"]);
    let actions = file_actions("sample.rs", &scanned).unwrap();
    let want: BTreeSet<String> = ["s3:ListBucket", "s3:PutObject", "s3:PutObjectTagging"]
        .map(String::from)
        .into();
    assert_eq!(actions, want);
    // The same call on a client the scanner cannot recognise is an error, not a silent miss.
    let hidden = scan("use aws_sdk_ecs::Client; fn g(c: &Client) { c.run_task().send(); }");
    let error = file_actions("hidden.rs", &hidden).unwrap_err();
    assert!(error.contains("1 `.send()` but 0 SDK calls"), "{error}");
    // A new SDK crate must be mapped before its calls count.
    let unknown =
        scan("use aws_sdk_sqs::Client; fn h(client: &Client) { client.send_message().send(); }");
    assert!(
        file_actions("sqs.rs", &unknown)
            .unwrap_err()
            .contains("aws_sdk_sqs")
    );
    // The IAM adapter's calls are named with the iam prefix.
    let iam =
        scan("use aws_sdk_iam::Client; fn i(client: &Client) { client.create_role().send(); }");
    assert_eq!(
        file_actions("iam.rs", &iam).unwrap(),
        BTreeSet::from(["iam:CreateRole".to_owned()])
    );
}
