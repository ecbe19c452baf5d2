//! Command line: `serve`, `bootstrap`, and the client subcommands (`create`, `get`,
//! `list`, ..., one per RPC; see `client`), all in the one binary.

mod client;
mod connect;
mod output;
mod progress;
mod report;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

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
    /// Create the DynamoDB table (idempotent); with `--emulate-platform` (builds with the
    /// `emulator` feature), also each environment's shared platform in the AWS emulator.
    Bootstrap {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        args: BootstrapArgs,
    },
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// The command line's definition (every subcommand, flag and `IM_*` variable), for the
/// check of the configuration reference against it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let usage = error.use_stderr();
            let _ = error.print();
            // `--help` and `--version` are not errors.
            return ExitCode::from(if usage { report::EXIT_USAGE } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    let outcome = match command {
        // Client commands print their own errors and choose their exit codes.
        Command::Client(command) => return client::run(command).await,
        command => serve_or_bootstrap(command).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_or_bootstrap(command: Command) -> anyhow::Result<()> {
    match command {
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
        Command::Bootstrap { config, args } => bootstrap(config.load()?, args).await,
        Command::Client(_) => anyhow::bail!("not a server command"),
    }
}

async fn dynamo_store(config: &Config) -> DynamoStore {
    let sdk = cloud::control_plane_sdk_config(&config.cloud_settings()).await;
    DynamoStore::new(
        cloud::aws::traced_client!(aws_sdk_dynamodb, &sdk),
        config.table.clone(),
    )
}

/// Flags of `bootstrap` besides the configuration.
#[derive(Debug, Clone, clap::Args)]
struct BootstrapArgs {
    /// Create each environment's shared platform (VPC, subnets, cluster, EFS, ALB with HTTPS
    /// listener, RDS record, master secret, log group, bucket) in the AWS emulator, for
    /// environments whose `platform` has no cluster yet. Refused without an emulator
    /// endpoint: in a real account the platform comes from infrastructure code. Only in
    /// builds with the `emulator` feature (`make dev`, `make test`).
    #[arg(long)]
    emulate_platform: bool,
    /// MySQL server that the emulated platform's master secret points at.
    #[cfg(feature = "emulator")]
    #[arg(long, env = "IM_MYSQL_HOST", default_value = "127.0.0.1")]
    mysql_host: String,
    #[cfg(feature = "emulator")]
    #[arg(long, env = "IM_MYSQL_PORT", default_value_t = 3306)]
    mysql_port: u16,
    #[cfg(feature = "emulator")]
    #[arg(long, env = "IM_MYSQL_USER", default_value = "root")]
    mysql_user: String,
    /// Prefer the environment variable: flags are visible to other local users.
    #[cfg(feature = "emulator")]
    #[arg(
        long,
        env = "IM_MYSQL_PASSWORD",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    mysql_password: String,
    /// Write the resulting configuration (platforms included) to this TOML file, for
    /// `serve --config`. It holds no secret the input configuration did not hold.
    #[arg(long, value_name = "PATH")]
    write_config: Option<std::path::PathBuf>,
}

async fn bootstrap(config: Config, args: BootstrapArgs) -> anyhow::Result<()> {
    crate::telemetry::init(config.log_format, &config.log_filter);
    if args.emulate_platform && !cfg!(feature = "emulator") {
        anyhow::bail!(
            "--emulate-platform is not in this build: it needs the `emulator` cargo feature \
             (cargo build --features emulator; `make dev` and `make test` enable it)"
        );
    }
    if args.emulate_platform {
        // Before any side effect: never make stand-in infrastructure in a real account.
        for env in pending_platforms(&config).map(|i| &config.environments[i]) {
            if env.endpoint.is_none() && config.aws_endpoint.is_none() {
                anyhow::bail!(
                    "--emulate-platform creates stand-in infrastructure in an AWS emulator, and \
                     environment {} has no emulator endpoint (set aws_endpoint or its endpoint)",
                    env.name
                );
            }
        }
    }
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
    #[cfg(feature = "emulator")]
    let config = {
        let mut config = config;
        if args.emulate_platform {
            emulate_platforms(&mut config, &args).await?;
        }
        config
    };
    if let Some(path) = &args.write_config {
        write_config(&config, path)?;
        tracing::info!(path = %path.display(), "configuration written");
    }
    Ok(())
}

/// Creates the platform of every environment that has none yet, through that
/// environment's own account, and records it in `config`.
#[cfg(feature = "emulator")]
async fn emulate_platforms(config: &mut Config, args: &BootstrapArgs) -> anyhow::Result<()> {
    let pending: Vec<usize> = pending_platforms(config).collect();
    if pending.is_empty() {
        tracing::info!("every environment has its platform");
        return Ok(());
    }
    let master = cloud::MasterCredentials {
        host: args.mysql_host.clone(),
        port: args.mysql_port,
        username: args.mysql_user.clone(),
        password: crate::config::Secret::new(args.mysql_password.clone()),
        // The emulated platform's database is a local server without TLS.
        tls: cloud::DbTls::Disabled,
        ca_file: None,
    };
    // The master secret will point at this server: find out now if it cannot be reached.
    use cloud::Database as _;
    cloud::mysql::MySqlDatabase::new()
        .database_exists(&master, "mysql")
        .await
        .with_context(|| {
            format!(
                "cannot use the MySQL server at {}:{} as {} (see --mysql-* flags)",
                master.host, master.port, master.username
            )
        })?;
    let accounts = cloud::accounts::Accounts::new(&*config).await;
    for (environment, outcome) in accounts.verify().await {
        if let Err(reason) = outcome {
            if pending
                .iter()
                .any(|&i| config.environments[i].name == environment)
            {
                anyhow::bail!("{reason}");
            }
            tracing::warn!(%environment, %reason, "environment unavailable");
        }
    }
    for i in pending {
        let env = &mut config.environments[i];
        let domain = if env.platform.domain.is_empty() {
            format!("{}.sites.localhost", env.name.short())
        } else {
            env.platform.domain.clone()
        };
        let sdk = accounts.sdk_config(env.name)?;
        let mut platform = cloud::platform::ensure_platform(&sdk, env.name, &master, &domain)
            .await
            .with_context(|| format!("cannot create the platform of environment {}", env.name))?;
        // Quotas the configuration sets for the emulated pool's members (by name) stay.
        for lb in &mut platform.load_balancers {
            if let Some(given) = env
                .platform
                .load_balancers
                .iter()
                .find(|given| given.name == lb.name)
            {
                lb.max_rules = given.max_rules;
                lb.max_target_groups = given.max_target_groups;
                lb.max_certificates = given.max_certificates;
            }
        }
        platform.max_custom_domains = env.platform.max_custom_domains;
        tracing::info!(
            environment = %env.name,
            vpc = %platform.vpc_id,
            cluster = %platform.cluster,
            load_balancers = %platform
                .load_balancers
                .iter()
                .map(|lb| lb.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            hosted_zone = %platform.hosted_zone_id,
            "platform ready"
        );
        env.platform = platform;
    }
    Ok(())
}

/// Indexes of the environments whose platform has not been created yet.
fn pending_platforms(config: &Config) -> impl Iterator<Item = usize> + '_ {
    (0..config.environments.len()).filter(|&i| config.environments[i].platform.cluster.is_empty())
}

/// Writes `config` as TOML, readable by its owner only (it may hold the input's secrets),
/// replacing `path` atomically.
fn write_config(config: &Config, path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = config
        .toml_with_secrets()
        .context("cannot render the configuration")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let partial = path.with_extension("toml.partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.write_all(b"# written by `instance-manager bootstrap`; use with `serve --config`\n")
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
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
    let telemetry = crate::telemetry::init_with_traces(
        config.log_format,
        &config.log_filter,
        &config.tracing,
        &config.replica_id(),
    )?;
    tracing::info!(config = %config.redacted_toml().replace('\n', "; "), "starting");
    if config.tracing.enabled() {
        tracing::info!(endpoint = %config.tracing.otlp_endpoint, sample_ratio = config.tracing.sample_ratio, "exporting traces with OTLP");
    }
    let served = serve_until_stopped(&config).await;
    // After the server and the engine stopped: their last spans are queued by now.
    telemetry.shutdown().await;
    served
}

async fn serve_until_stopped(config: &Config) -> anyhow::Result<()> {
    // Both ports are taken before anything else, so a clash fails at once and a client that
    // can connect to the gRPC port can scrape metrics too.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    crate::server::run(config, listener, metrics, shutdown).await?;
    Ok(())
}
