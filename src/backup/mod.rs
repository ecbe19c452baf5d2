//! Logical backups of tenant databases, streamed: the standard dump program's output
//! gzipped into a multipart upload ([`dump_to`]), and an object streamed back, checked and
//! gunzipped into the standard client for a fresh database ([`restore_from`]); then
//! [`verify_copy`] compares the copy with its original (row counts, `CHECKSUM TABLE`,
//! views, triggers, routines, events). Memory stays bounded by the upload's part size
//! whatever the database's size: nothing here holds a dump whole.
//!
//! Why the control plane runs `mariadb-dump`/`mysqldump` itself (README "Backups: where
//! the dump runs"): the standard tool has full fidelity (views, triggers, routines,
//! events, character sets and collations) and a consistent snapshot
//! (`--single-transaction`); running it here keeps memory bounded (a pipe into a
//! multipart upload) and is testable against the real MariaDB; the price is that the
//! client programs must be in the control plane's image.

mod client;
pub mod content;
mod dump;
mod restore;
mod verify;

pub use client::{DefaultsFile, DumpTools, Flavour, STDERR_LIMIT, option_file};
pub use dump::{DumpSummary, dump_arguments, dump_to};
pub use restore::{RestoreSummary, restore_from, verify_object};
pub use verify::{DatabaseFacts, TableFacts, database_facts, differences, verify_copy};
