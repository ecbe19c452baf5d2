//! Command line: `serve`, `bootstrap` (and, later, client subcommands).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiSettings, PageTokens};
use crate::cloud;
use crate::config::{Config, ConfigArgs};
use crate::store::DynamoStore;

#[derive(Debug, Parser)]
#[command(
    name = "instance-manager",
    version,
    about = "Control plane for dedicated WordPress instances on AWS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the effective configuration (secrets redacted) and exit.
        #[arg(long)]
        dump_config: bool,
    },
    /// Create the DynamoDB table (idempotent).
    Bootstrap {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            dump_config,
        } => {
            let config = config.load()?;
            if dump_config {
                print!("{}", config.redacted_toml());
                return Ok(());
            }
            serve(config).await
        }
        Command::Bootstrap { config } => bootstrap(config.load()?).await,
    }
}

async fn dynamo_store(config: &Config) -> DynamoStore {
    let sdk = cloud::control_plane_sdk_config(config).await;
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), config.table.clone())
}

async fn bootstrap(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(config.log_format, &config.log_filter);
    let store = dynamo_store(&config).await;
    let created = store
        .ensure_table()
        .await
        .with_context(|| format!("cannot create table {}", config.table))?;
    if created {
        tracing::info!(table = %config.table, "table created");
    } else {
        tracing::info!(table = %config.table, "table already exists");
    }
    Ok(())
}

/// First SIGTERM/SIGINT: drain gracefully. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second shutdown signal: exiting now");
    std::process::exit(130);
}

async fn serve(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(config.log_format, &config.log_filter);
    tracing::info!(config = %config.redacted_toml().replace('\n', "; "), "starting");
    let tokens = if config.page_token_secret.is_empty() {
        tracing::warn!(
            "no page_token_secret configured: page tokens are valid only in this process"
        );
        PageTokens::random()
    } else {
        PageTokens::new(config.page_token_secret.expose().as_bytes())
    };
    let store = dynamo_store(&config).await;
    let api = Api::new(
        Arc::new(store),
        ApiSettings {
            scale_bounds: config.scale_bounds,
            idempotency_ttl_secs: config.idempotency_ttl_secs,
            default_page_size: config.default_page_size,
            max_page_size: config.max_page_size,
        },
        tokens,
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    crate::server::serve(
        api,
        listener,
        shutdown,
        Duration::from_secs(config.shutdown_grace_secs),
    )
    .await?;
    Ok(())
}
