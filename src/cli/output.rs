//! Printing results: aligned tables for people, JSON (protobuf's canonical JSON mapping, as
//! grpcurl prints it) for programs.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns and `key: value` lines.
    Table,
    /// The protobuf JSON mapping (camelCase fields, enum names, RFC 3339 times).
    Json,
}

/// Server-provided text made safe for a terminal: control characters (escape sequences,
/// carriage returns, new lines) are shown escaped instead of acting on the terminal.
pub fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| match c {
            '\t' => " ".to_owned(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The enum value's name without its type prefix: `INSTANCE_STATE_ACTIVE` → `ACTIVE`.
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map(ToString::to_string).unwrap_or_default()
}

pub fn duration(duration: Option<&prost_types::Duration>) -> String {
    match duration {
        Some(d) => {
            let secs = d.seconds as f64 + f64::from(d.nanos) / 1e9;
            if secs < 1.0 {
                format!("{:.0} ms", secs * 1000.0)
            } else {
                format!("{secs:.1} s")
            }
        }
        None => String::new(),
    }
}

/// Columns, padded to the widest cell; the last column is not padded.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table on stdout, or `none` on stderr when it has no rows (a list command's
    /// output).
    pub fn print_or(&self, none: &str) {
        if self.is_empty() {
            eprintln!("{none}");
        } else {
            print!("{}", self.render());
        }
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 < columns {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                } else {
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines, keys aligned; empty values are left out.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        out.push_str(&format!("{key:width$}  {}\n", clean(value)));
    }
    out
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes");
        // google.rpc error details (ErrorInfo, BadRequest, ...), so an operation's error
        // details print as messages too. Files already in the pool are skipped.
        let _ = pool.decode_file_descriptor_set(proto::GOOGLE_RPC_FILE_DESCRIPTOR_SET);
        pool
    })
}

/// `message` as a message of the descriptor pool, for the JSON mapping.
fn dynamic<M: prost::Message + prost::Name>(message: &M) -> Result<DynamicMessage, String> {
    let descriptor = pool()
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| format!("no descriptor for {}", M::full_name()))?;
    DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| format!("cannot render {}: {e}", M::full_name()))
}

/// `message` in the protobuf JSON mapping, in the order of its fields. Any fields (an
/// operation's metadata, response, error details) are expanded with their `@type`.
pub fn json_text<M: prost::Message + prost::Name>(message: &M, pretty: bool) -> String {
    let rendered = dynamic(message).and_then(|dynamic| {
        if pretty {
            serde_json::to_string_pretty(&dynamic)
        } else {
            serde_json::to_string(&dynamic)
        }
        .map_err(|e| format!("cannot render {}: {e}", M::full_name()))
    });
    rendered.unwrap_or_else(|error| serde_json::json!({ "error": error }).to_string())
}

/// Prints `message` as pretty JSON on stdout.
pub fn print_message<M: prost::Message + prost::Name>(message: &M) {
    println!("{}", json_text(message, true));
}

/// Prints `message` as one JSON line (for streams: one object per event).
pub fn print_message_line<M: prost::Message + prost::Name>(message: &M) {
    println!("{}", json_text(message, false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;

    #[test]
    fn tables_align_and_escape() {
        let mut table = Table::new(&["NAME", "STATE"]);
        table.row(vec!["tenants/a/instances/wp".into(), "ACTIVE".into()]);
        table.row(vec!["x".into(), "FAILED\u{1b}[31m".into()]);
        let text = table.render();
        assert_eq!(
            text,
            "NAME                    STATE\ntenants/a/instances/wp  ACTIVE\nx                       FAILED\\u{1b}[31m\n"
        );
    }

    #[test]
    fn json_follows_the_protobuf_mapping_and_expands_any() {
        let metadata = v1::OperationMetadata {
            target: "tenants/a/instances/wp".into(),
            status: v1::OperationStatus::Completed as i32,
            progress_percent: 100,
            ..Default::default()
        };
        let operation = crate::proto::google_longrunning::Operation {
            name: "operations/x".into(),
            // Packed as the server packs it.
            metadata: Some(prost_types::Any {
                type_url: "type.googleapis.com/bbws.instance.v1.OperationMetadata".into(),
                value: prost::Message::encode_to_vec(&metadata),
            }),
            done: true,
            result: None,
        };
        let text = json_text(&operation, true);
        assert!(
            text.starts_with("{\n  \"name\": \"operations/x\""),
            "field order: {text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["name"], "operations/x");
        assert_eq!(value["done"], true);
        assert_eq!(
            value["metadata"]["@type"],
            "type.googleapis.com/bbws.instance.v1.OperationMetadata"
        );
        assert_eq!(value["metadata"]["status"], "OPERATION_STATUS_COMPLETED");
        assert_eq!(value["metadata"]["progressPercent"], 100);
    }
}
