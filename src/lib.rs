//! instance-manager: a gRPC control plane that provisions and runs dedicated WordPress
//! environments on AWS. Layers point inward: `domain` knows nothing of tonic or AWS;
//! `store` persists domain state; `api` and `server` are the only places that know tonic.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod domain;
pub mod health;
pub mod logs;
pub mod metrics;
pub mod proto;
pub mod reconcile;
pub mod request_id;
pub mod retention;
pub mod rpc_metrics;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod usage;
pub mod workflow;
