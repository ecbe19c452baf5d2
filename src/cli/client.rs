//! The client subcommands: one per RPC of `bbws.instance.v1.InstanceService` and
//! `google.longrunning.Operations`. They print tables (or `--output json`) on stdout,
//! progress and errors on stderr, and exit 0 only when the call succeeded and, for an
//! operation followed with `--watch`, the operation ended COMPLETED (see `report` for the
//! codes).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::proto::google_longrunning as lro;
use crate::proto::v1;

use super::connect::{ClientArgs, Conn};
use super::output::{self, Format, Table, clean, fields, print_message, print_message_line, short};
use super::progress::{self, metadata, status_name, step_name};
use super::report::CliError;

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create an instance (NAME: tenants/{tenant}/instances/{instance}, or tenant/instance;
    /// tenants/{tenant} alone lets the server choose the instance id).
    Create(CreateArgs),
    /// Show an instance.
    Get(NameArgs),
    /// List instances (of one tenant, or of all).
    List(ListArgs),
    /// Change fields of an instance (image, version, size, count, labels, contacts).
    Update(UpdateArgs),
    /// Deprovision an instance (archive, remove every resource, verify).
    Delete(DeleteArgs),
    /// Suspend an ACTIVE instance (tasks stopped, a "suspended" page served, data kept).
    Suspend(SuspendArgs),
    /// Resume a SUSPENDED instance.
    Resume(MutateArgs),
    /// Restart an ACTIVE instance (a new deployment, rollout awaited).
    Restart(MutateArgs),
    /// Change the task count and/or the task size of an ACTIVE instance.
    Scale(ScaleArgs),
    /// Check the health of an instance now.
    Health(NameArgs),
    /// Ask the server itself whether it is serving (`grpc.health.v1.Health/Check`): exits
    /// 0 on SERVING, 1 otherwise. For container and orchestrator health checks.
    Healthcheck(HealthcheckArgs),
    /// CPU and memory utilisation, task counts and database size of an instance.
    Usage(UsageArgs),
    /// An instance's logs: a time range, or `--follow` to tail them.
    Logs(LogsArgs),
    /// Backups of an instance: create, get, list, delete, restore.
    #[command(subcommand)]
    Backups(BackupsCommand),
    /// Long-running operations: list, get, cancel, delete.
    #[command(subcommand)]
    Operations(OperationsCommand),
    /// Follow an operation's progress (operations/{id}) or an instance's state changes
    /// (tenants/{tenant}/instances/{instance}) until it ends.
    Watch(WatchArgs),
    /// Run a FAILED or STUCK operation again from its recorded steps.
    Retry(RetryArgs),
    /// Ask a running operation to stop (its completed steps are undone).
    Cancel(OperationArgs),
    /// The audit trail of mutating calls (admins).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit events, newest first.
    List(AuditListArgs),
}

#[derive(Debug, Args)]
pub struct AuditListArgs {
    /// tenants/{tenant}, a tenant id, or tenants/- (every tenant the caller may see).
    #[arg(default_value = "tenants/-")]
    pub parent: String,
    /// e.g. `principal = "token:ci" AND outcome = PERMISSION_DENIED` (also `method`,
    /// `target`).
    #[arg(long, default_value = "")]
    pub filter: String,
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    #[arg(long, default_value = "")]
    pub page_token: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum BackupsCommand {
    /// Back up an instance's database and content.
    Create(BackupCreateArgs),
    /// Show a backup (tenants/{tenant}/instances/{instance}/backups/{backup}).
    Get(NameArgs),
    /// List an instance's backups, newest first.
    List(PageArgs),
    /// Delete a backup and its objects.
    Delete(BackupDeleteArgs),
    /// Replace an instance's database and content with those of one of its backups.
    Restore(RestoreArgs),
}

#[derive(Debug, Subcommand)]
pub enum OperationsCommand {
    /// List operations, newest first.
    List(OperationsListArgs),
    /// Show an operation and its steps.
    Get(OperationArgs),
    /// Ask a running operation to stop.
    Cancel(OperationArgs),
    /// Delete an operation's record.
    Delete(OperationArgs),
}

/// `--request-id` and `--watch`, on every mutating command.
#[derive(Debug, Clone, Args)]
pub struct MutateOpts {
    /// Idempotency key: repeating the command with the same id returns the operation the
    /// first one started instead of starting another.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Follow the operation until it ends, one progress bar per step; exit 0 only if it
    /// ends COMPLETED.
    #[arg(long, short = 'w')]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Resource name.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The service to ask about; empty: the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct MutateArgs {
    /// The instance: tenants/{tenant}/instances/{instance} (or tenant/instance).
    pub name: String,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// tenants/{tenant}/instances/{instance}, tenant/instance, or tenants/{tenant}.
    pub name: String,
    /// Environment to deploy to.
    #[arg(long, short = 'e', value_parser = parse_environment)]
    pub environment: i32,
    /// Display name of the customer organisation.
    #[arg(long)]
    pub organization: Option<String>,
    /// The customer's technical contact.
    #[arg(long)]
    pub contact_email: Option<String>,
    /// basic, standard or premium (chooses the default CPU and memory).
    #[arg(long, value_parser = parse_tier)]
    pub tier: Option<i32>,
    /// Tasks to run (default: the server's, 2).
    #[arg(long)]
    pub count: Option<i32>,
    /// Fargate CPU units per task.
    #[arg(long)]
    pub cpu: Option<i32>,
    /// Memory per task in MiB.
    #[arg(long)]
    pub memory_mib: Option<i32>,
    /// WordPress image repository.
    #[arg(long)]
    pub image: Option<String>,
    /// Tag of the WordPress image.
    #[arg(long)]
    pub wordpress_version: Option<String>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A host name of the customer's own the site is also served at, with its own
    /// certificate (repeatable).
    #[arg(long = "custom-domain")]
    pub custom_domains: Vec<String>,
    /// Sales opportunity (the `bbws:opportunity` tag).
    #[arg(long)]
    pub opportunity: Option<String>,
    /// Cost center to bill (the `bbws:cost-center` tag).
    #[arg(long)]
    pub cost_center: Option<String>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// A tenant (tenants/{tenant} or just its id); all tenants when left out.
    pub tenant: Option<String>,
    /// Only this environment (dev, sit, prod).
    #[arg(long, short = 'e', value_parser = parse_environment)]
    pub environment: Option<i32>,
    /// Only this state (active, suspended, failed, ...).
    #[arg(long, value_parser = parse_state)]
    pub state: Option<i32>,
    /// Instances per page (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    /// Token of the page to show (printed on stderr after a page when there are more).
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The instance.
    pub name: String,
    /// New WordPress image repository.
    #[arg(long)]
    pub image: Option<String>,
    /// New tag of the WordPress image (a rolling update).
    #[arg(long)]
    pub wordpress_version: Option<String>,
    /// New Fargate CPU units per task.
    #[arg(long)]
    pub cpu: Option<i32>,
    /// New memory per task in MiB.
    #[arg(long)]
    pub memory_mib: Option<i32>,
    /// New number of tasks.
    #[arg(long)]
    pub count: Option<i32>,
    /// Replace the labels with these, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Remove every label.
    #[arg(long, conflicts_with = "labels")]
    pub clear_labels: bool,
    /// New display name of the organisation.
    #[arg(long)]
    pub organization: Option<String>,
    /// New technical contact.
    #[arg(long)]
    pub contact_email: Option<String>,
    /// Replace the custom domains with these (repeatable; the same ones again resume
    /// certificates still pending validation).
    #[arg(long = "custom-domain")]
    pub custom_domains: Vec<String>,
    /// Remove every custom domain.
    #[arg(long, conflicts_with = "custom_domains")]
    pub clear_custom_domains: bool,
    /// Only if the instance still has this etag (from `get`).
    #[arg(long)]
    pub etag: Option<String>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The instance.
    pub name: String,
    /// Skip the archive of the database and content: the data is lost.
    #[arg(long)]
    pub skip_archive: bool,
    /// Only if the instance still has this etag.
    #[arg(long)]
    pub etag: Option<String>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// The instance.
    pub name: String,
    /// Why (kept in the audit trail), e.g. "non-payment".
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The instance.
    pub name: String,
    /// New number of tasks.
    #[arg(long)]
    pub count: Option<i32>,
    /// New Fargate CPU units per task.
    #[arg(long)]
    pub cpu: Option<i32>,
    /// New memory per task in MiB.
    #[arg(long)]
    pub memory_mib: Option<i32>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The instance.
    pub name: String,
    /// How far back to look: 90s, 30m, 6h, 2d (default: the server's).
    #[arg(long, value_parser = parse_duration)]
    pub window: Option<prost_types::Duration>,
    /// Length of each data point's interval (default: the server's).
    #[arg(long, value_parser = parse_duration)]
    pub period: Option<prost_types::Duration>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The instance.
    pub name: String,
    /// From this time: RFC 3339 (2026-12-01T10:00:00Z) or an age (15m, 2h).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Until this time (not with --follow).
    #[arg(long, value_parser = parse_time, conflicts_with = "follow")]
    pub until: Option<prost_types::Timestamp>,
    /// CloudWatch Logs filter pattern.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Keep streaming new lines as they arrive (Ctrl-C stops).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Lines per page (not with --follow).
    #[arg(long, default_value_t = 0, conflicts_with = "follow")]
    pub page_size: i32,
    /// Token of the page to show.
    #[arg(long, default_value = "", conflicts_with = "follow")]
    pub page_token: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct BackupCreateArgs {
    /// The instance to back up.
    pub instance: String,
    /// Id of the new backup (default: the server chooses).
    #[arg(long, default_value = "")]
    pub backup_id: String,
    /// Free-form description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct PageArgs {
    /// The instance.
    pub parent: String,
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    #[arg(long, default_value = "")]
    pub page_token: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct BackupDeleteArgs {
    /// The backup.
    pub name: String,
    /// Only if the backup still has this etag.
    #[arg(long, default_value = "")]
    pub etag: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The instance to restore.
    pub instance: String,
    /// The backup to restore from (its full name, or just its id).
    #[arg(long)]
    pub backup: String,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct OperationsListArgs {
    /// Only operations on this instance.
    #[arg(long)]
    pub target: Option<String>,
    /// Only operations in this status (pending, in_progress, completed, failed, stuck,
    /// cancelled).
    #[arg(long)]
    pub status: Option<String>,
    /// Only finished (true) or unfinished (false) operations.
    #[arg(long)]
    pub done: Option<bool>,
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
    #[arg(long, default_value = "")]
    pub page_token: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct OperationArgs {
    /// operations/{id}, or just the id.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// operations/{id} (or the id), or an instance's name.
    pub name: String,
    /// For an operation: replay its events from this sequence number.
    #[arg(long, default_value_t = 0)]
    pub from_sequence: i64,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// operations/{id}, or just the id.
    pub name: String,
    #[command(flatten)]
    pub opts: MutateOpts,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl ClientCommand {
    fn client(&self) -> &ClientArgs {
        match self {
            Self::Create(a) => &a.client,
            Self::Get(a) | Self::Health(a) => &a.client,
            Self::Healthcheck(a) => &a.client,
            Self::List(a) => &a.client,
            Self::Update(a) => &a.client,
            Self::Delete(a) => &a.client,
            Self::Suspend(a) => &a.client,
            Self::Resume(a) | Self::Restart(a) => &a.client,
            Self::Scale(a) => &a.client,
            Self::Usage(a) => &a.client,
            Self::Logs(a) => &a.client,
            Self::Backups(BackupsCommand::Create(a)) => &a.client,
            Self::Backups(BackupsCommand::Get(a)) => &a.client,
            Self::Backups(BackupsCommand::List(a)) => &a.client,
            Self::Backups(BackupsCommand::Delete(a)) => &a.client,
            Self::Backups(BackupsCommand::Restore(a)) => &a.client,
            Self::Operations(OperationsCommand::List(a)) => &a.client,
            Self::Operations(
                OperationsCommand::Get(a)
                | OperationsCommand::Cancel(a)
                | OperationsCommand::Delete(a),
            ) => &a.client,
            Self::Cancel(a) => &a.client,
            Self::Watch(a) => &a.client,
            Self::Retry(a) => &a.client,
            Self::Audit(AuditCommand::List(a)) => &a.client,
        }
    }
}

/// Runs one client subcommand and says how the process should exit; errors are printed
/// here, on stderr.
pub async fn run(command: ClientCommand) -> ExitCode {
    match execute(command).await {
        Ok(()) => ExitCode::from(super::report::EXIT_OK),
        Err(error) => {
            eprintln!("error: {error}");
            error.exit_code()
        }
    }
}

async fn execute(command: ClientCommand) -> Result<(), CliError> {
    let conn = Conn::open(command.client()).await?;
    match command {
        ClientCommand::Create(args) => create(&conn, args).await,
        ClientCommand::Get(args) => {
            let instance = conn
                .instances
                .clone()
                .get_instance(conn.unary(v1::GetInstanceRequest {
                    name: instance_name(&args.name),
                }))
                .await?
                .into_inner();
            print_instance(&conn, &instance);
            Ok(())
        }
        ClientCommand::List(args) => list(&conn, args).await,
        ClientCommand::Update(args) => update(&conn, args).await,
        ClientCommand::Delete(args) => {
            let request = v1::DeleteInstanceRequest {
                name: instance_name(&args.name),
                etag: args.etag.unwrap_or_default(),
                skip_archive: args.skip_archive,
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .delete_instance(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Suspend(args) => {
            let request = v1::SuspendInstanceRequest {
                name: instance_name(&args.name),
                reason: args.reason.unwrap_or_default(),
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .suspend_instance(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Resume(args) => {
            let request = v1::ResumeInstanceRequest {
                name: instance_name(&args.name),
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .resume_instance(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Restart(args) => {
            let request = v1::RestartInstanceRequest {
                name: instance_name(&args.name),
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .restart_instance(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Scale(args) => {
            let request = v1::ScaleInstanceRequest {
                name: instance_name(&args.name),
                desired_count: args.count.unwrap_or(0),
                cpu: args.cpu.unwrap_or(0),
                memory_mib: args.memory_mib.unwrap_or(0),
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .scale_instance(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Health(args) => {
            let report = conn
                .instances
                .clone()
                .check_instance_health(conn.unary(v1::CheckInstanceHealthRequest {
                    name: instance_name(&args.name),
                }))
                .await?
                .into_inner();
            print_health(&conn, &report);
            Ok(())
        }
        ClientCommand::Healthcheck(args) => healthcheck(&conn, &args.service).await,
        ClientCommand::Usage(args) => {
            let usage = conn
                .instances
                .clone()
                .get_resource_usage(conn.unary(v1::GetResourceUsageRequest {
                    name: instance_name(&args.name),
                    window: args.window,
                    period: args.period,
                }))
                .await?
                .into_inner();
            print_usage(&conn, &usage);
            Ok(())
        }
        ClientCommand::Logs(args) => logs(&conn, args).await,
        ClientCommand::Backups(command) => backups(&conn, command).await,
        ClientCommand::Operations(command) => operations(&conn, command).await,
        ClientCommand::Watch(args) => watch(&conn, args).await,
        ClientCommand::Retry(args) => {
            let operation = conn
                .instances
                .clone()
                .retry_operation(conn.unary(v1::RetryOperationRequest {
                    name: operation_name(&args.name),
                    request_id: args.opts.request_id.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            finish_operation(&conn, operation, args.opts.watch).await
        }
        ClientCommand::Cancel(args) => cancel(&conn, &args.name).await,
        ClientCommand::Audit(AuditCommand::List(args)) => audit_list(&conn, args).await,
    }
}

async fn audit_list(conn: &Conn, args: AuditListArgs) -> Result<(), CliError> {
    let parent = if args.parent.starts_with("tenants/") {
        args.parent
    } else {
        format!("tenants/{}", args.parent)
    };
    let page = conn
        .instances
        .clone()
        .list_audit_events(conn.unary(v1::ListAuditEventsRequest {
            parent,
            page_size: args.page_size,
            page_token: args.page_token,
            filter: args.filter,
        }))
        .await?
        .into_inner();
    match conn.format {
        Format::Json => print_message(&page),
        Format::Table => {
            let mut table = Table::new(&[
                "TIME",
                "PRINCIPAL",
                "METHOD",
                "TARGET",
                "OUTCOME",
                "REQUEST ID",
                "OPERATION",
            ]);
            for e in &page.audit_events {
                table.row(vec![
                    output::time(e.event_time.as_ref()),
                    e.principal.clone(),
                    crate::auth::authz::short_name(&e.method).to_owned(),
                    e.target.clone(),
                    e.outcome.clone(),
                    e.request_id.clone(),
                    e.operation.clone(),
                ]);
            }
            table.print_or("no audit events");
        }
    }
    more_pages(&page.next_page_token);
    Ok(())
}

/// Tells how to ask for the next page, if there is one.
fn more_pages(next_page_token: &str) {
    if !next_page_token.is_empty() {
        eprintln!("more: --page-token {next_page_token}");
    }
}

async fn create(conn: &Conn, args: CreateArgs) -> Result<(), CliError> {
    let (parent, instance_id) = split_create_name(&args.name);
    let instance = v1::Instance {
        environment: args.environment,
        organization_name: args.organization.unwrap_or_default(),
        contact_email: args.contact_email.unwrap_or_default(),
        tier: args.tier.unwrap_or(0),
        desired_count: args.count.unwrap_or(0),
        cpu: args.cpu.unwrap_or(0),
        memory_mib: args.memory_mib.unwrap_or(0),
        wordpress_image: args.image.unwrap_or_default(),
        wordpress_version: args.wordpress_version.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
        opportunity_id: args.opportunity.unwrap_or_default(),
        cost_center: args.cost_center.unwrap_or_default(),
        custom_domains: args.custom_domains,
        ..Default::default()
    };
    let request = v1::CreateInstanceRequest {
        parent,
        instance_id,
        instance: Some(instance),
        request_id: args.opts.request_id.clone().unwrap_or_default(),
    };
    let operation = conn
        .instances
        .clone()
        .create_instance(conn.unary(request))
        .await?
        .into_inner();
    finish_operation(conn, operation, args.opts.watch).await
}

async fn list(conn: &Conn, args: ListArgs) -> Result<(), CliError> {
    let parent = match args.tenant.as_deref() {
        None => "tenants/-".to_owned(),
        Some(t) if t.starts_with("tenants/") => t.to_owned(),
        Some(t) => format!("tenants/{t}"),
    };
    let mut token = args.page_token.clone();
    let mut all = Vec::new();
    loop {
        let page = conn
            .instances
            .clone()
            .list_instances(conn.unary(v1::ListInstancesRequest {
                parent: parent.clone(),
                page_size: args.page_size,
                page_token: token.clone(),
                environment: args.environment.unwrap_or(0),
                state: args.state.unwrap_or(0),
            }))
            .await?
            .into_inner();
        all.extend(page.instances);
        token = page.next_page_token;
        if token.is_empty() || !args.all {
            break;
        }
    }
    match conn.format {
        Format::Json => print_message(&v1::ListInstancesResponse {
            instances: all,
            next_page_token: token.clone(),
        }),
        Format::Table => {
            let mut table =
                Table::new(&["NAME", "ENV", "STATE", "TASKS", "SIZE", "URL", "OPERATION"]);
            for i in &all {
                table.row(vec![
                    i.name.clone(),
                    short(i.environment().as_str_name(), "ENVIRONMENT_"),
                    short(i.state().as_str_name(), "INSTANCE_STATE_"),
                    i.desired_count.to_string(),
                    format!("{}/{}", i.cpu, i.memory_mib),
                    i.url.clone(),
                    i.current_operation.clone(),
                ]);
            }
            table.print_or("no instances");
        }
    }
    if !token.is_empty() {
        eprintln!("more: --page-token {token} (or --all)");
    }
    Ok(())
}

async fn update(conn: &Conn, args: UpdateArgs) -> Result<(), CliError> {
    let mut instance = v1::Instance {
        name: instance_name(&args.name),
        etag: args.etag.unwrap_or_default(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(image) = args.image {
        instance.wordpress_image = image;
        paths.push("wordpress_image");
    }
    if let Some(version) = args.wordpress_version {
        instance.wordpress_version = version;
        paths.push("wordpress_version");
    }
    if let Some(cpu) = args.cpu {
        instance.cpu = cpu;
        paths.push("cpu");
    }
    if let Some(memory) = args.memory_mib {
        instance.memory_mib = memory;
        paths.push("memory_mib");
    }
    if let Some(count) = args.count {
        instance.desired_count = count;
        paths.push("desired_count");
    }
    if !args.labels.is_empty() || args.clear_labels {
        instance.labels = args.labels.into_iter().collect();
        paths.push("labels");
    }
    if let Some(organization) = args.organization {
        instance.organization_name = organization;
        paths.push("organization_name");
    }
    if let Some(email) = args.contact_email {
        instance.contact_email = email;
        paths.push("contact_email");
    }
    if !args.custom_domains.is_empty() || args.clear_custom_domains {
        instance.custom_domains = args.custom_domains;
        paths.push("custom_domains");
    }
    // An empty mask goes to the server too, which says what is wrong with it.
    let request = v1::UpdateInstanceRequest {
        instance: Some(instance),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.into_iter().map(str::to_owned).collect(),
        }),
        request_id: args.opts.request_id.clone().unwrap_or_default(),
    };
    let operation = conn
        .instances
        .clone()
        .update_instance(conn.unary(request))
        .await?
        .into_inner();
    finish_operation(conn, operation, args.opts.watch).await
}

async fn logs(conn: &Conn, args: LogsArgs) -> Result<(), CliError> {
    let name = instance_name(&args.name);
    if args.follow {
        let mut stream = conn
            .instances
            .clone()
            .tail_logs(v1::TailLogsRequest {
                name,
                filter: args.filter,
                since: args.since,
                follow: true,
            })
            .await?
            .into_inner();
        while let Some(batch) = stream.message().await? {
            for entry in &batch.entries {
                print_log_entry(conn, entry);
            }
        }
        return Ok(());
    }
    let page = conn
        .instances
        .clone()
        .query_logs(conn.unary(v1::QueryLogsRequest {
            name,
            start_time: args.since,
            end_time: args.until,
            filter: args.filter,
            page_size: args.page_size,
            page_token: args.page_token,
        }))
        .await?
        .into_inner();
    match conn.format {
        Format::Json => print_message(&page),
        Format::Table => {
            for entry in &page.entries {
                print_log_entry(conn, entry);
            }
        }
    }
    more_pages(&page.next_page_token);
    Ok(())
}

fn print_log_entry(conn: &Conn, entry: &v1::LogEntry) {
    match conn.format {
        Format::Json => print_message_line(entry),
        Format::Table => println!(
            "{}  {}  {}",
            output::time(entry.time.as_ref()),
            clean(&entry.stream),
            clean(&entry.message)
        ),
    }
}

async fn backups(conn: &Conn, command: BackupsCommand) -> Result<(), CliError> {
    match command {
        BackupsCommand::Create(args) => {
            let request = v1::CreateBackupRequest {
                parent: instance_name(&args.instance),
                backup_id: args.backup_id,
                backup: Some(v1::Backup {
                    description: args.description,
                    labels: args.labels.into_iter().collect(),
                    ..Default::default()
                }),
                request_id: args.opts.request_id.clone().unwrap_or_default(),
            };
            let operation = conn
                .instances
                .clone()
                .create_backup(conn.unary(request))
                .await?
                .into_inner();
            finish_operation(conn, operation, args.opts.watch).await
        }
        BackupsCommand::Get(args) => {
            let backup = conn
                .instances
                .clone()
                .get_backup(conn.unary(v1::GetBackupRequest { name: args.name }))
                .await?
                .into_inner();
            match conn.format {
                Format::Json => print_message(&backup),
                Format::Table => print!("{}", backup_fields(&backup)),
            }
            Ok(())
        }
        BackupsCommand::List(args) => {
            let page = conn
                .instances
                .clone()
                .list_backups(conn.unary(v1::ListBackupsRequest {
                    parent: instance_name(&args.parent),
                    page_size: args.page_size,
                    page_token: args.page_token,
                }))
                .await?
                .into_inner();
            match conn.format {
                Format::Json => print_message(&page),
                Format::Table => {
                    let mut table =
                        Table::new(&["NAME", "STATE", "SIZE", "CREATED", "EXPIRES", "DESCRIPTION"]);
                    for b in &page.backups {
                        table.row(vec![
                            b.name.clone(),
                            short(b.state().as_str_name(), "BACKUP_STATE_"),
                            b.size_bytes.to_string(),
                            output::time(b.create_time.as_ref()),
                            output::time(b.expire_time.as_ref()),
                            b.description.clone(),
                        ]);
                    }
                    table.print_or("no backups");
                }
            }
            more_pages(&page.next_page_token);
            Ok(())
        }
        BackupsCommand::Delete(args) => {
            conn.instances
                .clone()
                .delete_backup(conn.unary(v1::DeleteBackupRequest {
                    name: args.name.clone(),
                    etag: args.etag,
                }))
                .await?;
            match conn.format {
                Format::Json => println!("{{}}"),
                Format::Table => println!("deleted {}", clean(&args.name)),
            }
            Ok(())
        }
        BackupsCommand::Restore(args) => {
            let name = instance_name(&args.instance);
            let backup = if args.backup.contains('/') {
                args.backup
            } else {
                format!("{name}/backups/{}", args.backup)
            };
            let operation = conn
                .instances
                .clone()
                .restore_instance(conn.unary(v1::RestoreInstanceRequest {
                    name,
                    backup,
                    request_id: args.opts.request_id.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            finish_operation(conn, operation, args.opts.watch).await
        }
    }
}

async fn operations(conn: &Conn, command: OperationsCommand) -> Result<(), CliError> {
    match command {
        OperationsCommand::List(args) => {
            let mut terms = Vec::new();
            if let Some(target) = &args.target {
                terms.push(format!("target = \"{}\"", instance_name(target)));
            }
            if let Some(status) = &args.status {
                terms.push(format!("status = {}", status.to_uppercase()));
            }
            if let Some(done) = args.done {
                terms.push(format!("done = {done}"));
            }
            let page = conn
                .operations
                .clone()
                .list_operations(conn.unary(lro::ListOperationsRequest {
                    name: "operations".into(),
                    filter: terms.join(" AND "),
                    page_size: args.page_size,
                    page_token: args.page_token,
                }))
                .await?
                .into_inner();
            match conn.format {
                Format::Json => print_message(&page),
                Format::Table => {
                    let mut table =
                        Table::new(&["NAME", "VERB", "TARGET", "STATUS", "DONE%", "UPDATED"]);
                    for operation in &page.operations {
                        let m = metadata(operation).unwrap_or_default();
                        table.row(vec![
                            operation.name.clone(),
                            m.verb.clone(),
                            m.target.clone(),
                            status_name(m.status()),
                            m.progress_percent.to_string(),
                            output::time(m.update_time.as_ref()),
                        ]);
                    }
                    table.print_or("no operations");
                }
            }
            more_pages(&page.next_page_token);
            Ok(())
        }
        OperationsCommand::Get(args) => {
            let operation = conn
                .operations
                .clone()
                .get_operation(conn.unary(lro::GetOperationRequest {
                    name: operation_name(&args.name),
                }))
                .await?
                .into_inner();
            print_operation(conn, &operation);
            Ok(())
        }
        OperationsCommand::Cancel(args) => cancel(conn, &args.name).await,
        OperationsCommand::Delete(args) => {
            let name = operation_name(&args.name);
            conn.operations
                .clone()
                .delete_operation(conn.unary(lro::DeleteOperationRequest { name: name.clone() }))
                .await?;
            match conn.format {
                Format::Json => println!("{{}}"),
                Format::Table => println!("deleted {}", clean(&name)),
            }
            Ok(())
        }
    }
}

async fn cancel(conn: &Conn, name: &str) -> Result<(), CliError> {
    let name = operation_name(name);
    conn.operations
        .clone()
        .cancel_operation(conn.unary(lro::CancelOperationRequest { name: name.clone() }))
        .await?;
    match conn.format {
        Format::Json => println!("{{}}"),
        Format::Table => println!(
            "cancellation of {} requested (follow it: watch {})",
            clean(&name),
            clean(&name)
        ),
    }
    Ok(())
}

async fn watch(conn: &Conn, args: WatchArgs) -> Result<(), CliError> {
    let name = args.name.trim();
    if !name.starts_with("operations/") && name.contains('/') {
        return watch_instance(conn, &instance_name(name)).await;
    }
    let name = operation_name(name);
    if args.from_sequence > 0 {
        // A replay from a given event: print the events themselves, no bars.
        let mut stream = conn
            .instances
            .clone()
            .watch_operation(v1::WatchOperationRequest {
                name: name.clone(),
                from_sequence: args.from_sequence,
            })
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            match conn.format {
                Format::Json => print_message_line(&event),
                Format::Table => println!(
                    "{:>4} {} [{:>3}%] {} {} {}",
                    event.sequence,
                    output::time(event.time.as_ref()),
                    event.progress_percent,
                    status_name(event.status()),
                    clean(&event.step),
                    clean(&event.message)
                ),
            }
        }
    }
    let operation = conn
        .operations
        .clone()
        .get_operation(conn.unary(lro::GetOperationRequest { name }))
        .await?
        .into_inner();
    // After a replay the stream has already shown the events to the end.
    finish_operation(conn, operation, args.from_sequence == 0).await
}

async fn watch_instance(conn: &Conn, name: &str) -> Result<(), CliError> {
    let mut stream = conn
        .instances
        .clone()
        .watch_instance(v1::WatchInstanceRequest {
            name: name.to_owned(),
        })
        .await?
        .into_inner();
    while let Some(change) = stream.message().await? {
        match conn.format {
            Format::Json => print_message_line(&change),
            Format::Table => {
                let instance = change.instance.clone().unwrap_or_default();
                let state = short(instance.state().as_str_name(), "INSTANCE_STATE_");
                let previous = change.previous_state();
                let transition = if previous == v1::InstanceState::Unspecified {
                    state
                } else {
                    format!(
                        "{} -> {state}",
                        short(previous.as_str_name(), "INSTANCE_STATE_")
                    )
                };
                println!(
                    "{}  {}  {}  {}",
                    output::time(change.change_time.as_ref()),
                    clean(&instance.name),
                    transition,
                    clean(&change.operation)
                );
            }
        }
    }
    Ok(())
}

/// Prints a just-started operation, or (with `watch`) follows it to its end and prints how
/// it ended. Not COMPLETED at the end is an error (exit code 3).
async fn finish_operation(
    conn: &Conn,
    operation: lro::Operation,
    watch: bool,
) -> Result<(), CliError> {
    let operation = if watch {
        progress::follow(conn, operation).await?
    } else {
        operation
    };
    print_operation(conn, &operation);
    if !operation.done {
        if conn.format == Format::Table {
            eprintln!("follow it: watch {}", clean(&operation.name));
        }
        return Ok(());
    }
    let status = metadata(&operation)
        .map(|m| m.status())
        .unwrap_or(v1::OperationStatus::Unspecified);
    let failed = matches!(&operation.result, Some(lro::operation::Result::Error(_)));
    if status == v1::OperationStatus::Completed && !failed {
        return Ok(());
    }
    let mut message = format!(
        "operation {} ended {}",
        clean(&operation.name),
        status_name(status)
    );
    if let Some(detail) = metadata(&operation)
        .map(|m| m.status_detail)
        .filter(|d| !d.is_empty())
    {
        message.push_str(&format!(": {}", clean(&detail)));
    }
    if let Some(lro::operation::Result::Error(error)) = &operation.result {
        message.push_str(&format!(
            "\n  {}",
            super::report::describe_status(&super::report::rpc_status(error)).replace('\n', "\n  ")
        ));
    }
    Err(CliError::OperationFailed(message))
}

fn print_operation(conn: &Conn, operation: &lro::Operation) {
    if conn.format == Format::Json {
        print_message(operation);
        return;
    }
    let m = metadata(operation).unwrap_or_default();
    let mut out = fields(&[
        ("operation", operation.name.clone()),
        ("verb", m.verb.clone()),
        ("target", m.target.clone()),
        ("status", status_name(m.status())),
        ("progress", format!("{}%", m.progress_percent)),
        ("attempt", m.attempt.to_string()),
        ("detail", m.status_detail.clone()),
        ("request id", m.request_id.clone()),
        ("created", output::time(m.create_time.as_ref())),
        ("ended", output::time(m.end_time.as_ref())),
    ]);
    if !m.steps.is_empty() {
        let mut table = Table::new(&["STEP", "STATUS", "TRIES", "RESOURCE", "ERROR"]);
        for step in &m.steps {
            table.row(vec![
                step.name.clone(),
                step_name(step.status()),
                step.attempts.to_string(),
                step.resource_id.clone(),
                step.error.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    print!("{out}");
}

fn print_instance(conn: &Conn, i: &v1::Instance) {
    if conn.format == Format::Json {
        print_message(i);
        return;
    }
    let labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    print!(
        "{}",
        fields(&[
            ("name", i.name.clone()),
            ("state", short(i.state().as_str_name(), "INSTANCE_STATE_")),
            (
                "environment",
                short(i.environment().as_str_name(), "ENVIRONMENT_")
            ),
            ("tier", short(i.tier().as_str_name(), "TIER_")),
            ("url", i.url.clone()),
            ("tasks", i.desired_count.to_string()),
            ("cpu", i.cpu.to_string()),
            ("memory MiB", i.memory_mib.to_string()),
            (
                "image",
                format!("{}:{}", i.wordpress_image, i.wordpress_version)
            ),
            ("organization", i.organization_name.clone()),
            ("contact", i.contact_email.clone()),
            ("labels", labels.join(", ")),
            ("operation", i.current_operation.clone()),
            ("failure", i.failure_reason.clone()),
            ("created", output::time(i.create_time.as_ref())),
            ("updated", output::time(i.update_time.as_ref())),
            ("etag", i.etag.clone()),
        ])
    );
    if let Some(lb) = &i.load_balancer {
        println!();
        print!(
            "{}",
            fields(&[
                ("load balancer", lb.name.clone()),
                ("listener", lb.listener_arn.clone()),
                ("dns name", lb.dns_name.clone()),
            ])
        );
    }
    if !i.custom_domain_statuses.is_empty() {
        let mut table = Table::new(&["CUSTOM DOMAIN", "STATE", "CERTIFICATE", "MESSAGE"]);
        for status in &i.custom_domain_statuses {
            table.row(vec![
                status.domain.clone(),
                short(status.state().as_str_name(), "STATE_"),
                status.certificate_arn.clone(),
                status.message.clone(),
            ]);
        }
        println!();
        print!("{}", table.render());
    } else if !i.custom_domains.is_empty() {
        println!();
        println!("custom domains: {}", i.custom_domains.join(", "));
    }
    if !i.dns_records.is_empty() {
        let mut table = Table::new(&["DNS RECORD", "TYPE", "VALUE", "PURPOSE", "CREATED BY"]);
        for record in &i.dns_records {
            let by = match (record.managed, record.in_sync) {
                (true, true) => "us (in sync)",
                (true, false) => "us (pending)",
                (false, _) => "the customer",
            };
            table.row(vec![
                record.name.clone(),
                record.r#type.clone(),
                record.value.clone(),
                short(record.purpose().as_str_name(), "PURPOSE_"),
                by.to_owned(),
            ]);
        }
        println!();
        print!("{}", table.render());
    }
    if !i.resources.is_empty() {
        let mut table = Table::new(&["RESOURCE", "ID"]);
        for (kind, id) in &i.resources {
            table.row(vec![kind.clone(), id.clone()]);
        }
        println!();
        print!("{}", table.render());
    }
}

/// `grpc.health.v1.Health/Check`: Ok only when the answer is SERVING (the status is
/// printed either way, so a probe's log says what the server answered).
async fn healthcheck(conn: &Conn, service: &str) -> Result<(), CliError> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let status = conn
        .health
        .clone()
        .check(conn.unary(HealthCheckRequest {
            service: service.to_owned(),
        }))
        .await?
        .into_inner()
        .status();
    let name = status.as_str_name();
    if status != ServingStatus::Serving {
        return Err(CliError::Local(format!("the server answers {name}")));
    }
    println!("{name}");
    Ok(())
}

fn print_health(conn: &Conn, report: &v1::HealthReport) {
    if conn.format == Format::Json {
        print_message(report);
        return;
    }
    print!(
        "{}",
        fields(&[
            ("name", report.name.clone()),
            (
                "overall",
                short(report.overall().as_str_name(), "HEALTH_STATUS_")
            ),
            ("checked", output::time(report.check_time.as_ref())),
        ])
    );
    let mut table = Table::new(&["CHECK", "STATUS", "LATENCY", "REASON"]);
    for check in &report.checks {
        let status = match check.status() {
            v1::HealthStatus::Unspecified => "SKIPPED".to_owned(),
            other => short(other.as_str_name(), "HEALTH_STATUS_"),
        };
        table.row(vec![
            check.name.clone(),
            status,
            output::duration(check.latency.as_ref()),
            check.reason.clone(),
        ]);
    }
    println!();
    print!("{}", table.render());
}

fn print_usage(conn: &Conn, usage: &v1::ResourceUsage) {
    if conn.format == Format::Json {
        print_message(usage);
        return;
    }
    print!(
        "{}",
        fields(&[
            ("name", usage.name.clone()),
            ("from", output::time(usage.start_time.as_ref())),
            ("to", output::time(usage.end_time.as_ref())),
            ("period", output::duration(usage.period.as_ref())),
            (
                "tasks",
                format!(
                    "{} running / {} desired",
                    usage.running_tasks, usage.desired_tasks
                )
            ),
            ("database", format!("{} bytes", usage.database_size_bytes)),
        ])
    );
    let memory: BTreeMap<String, f64> = usage
        .memory_utilization
        .iter()
        .map(|p| (output::time(p.time.as_ref()), p.value))
        .collect();
    let mut table = Table::new(&["TIME", "CPU %", "MEMORY %"]);
    for point in &usage.cpu_utilization {
        let time = output::time(point.time.as_ref());
        let mem = memory
            .get(&time)
            .map(|v| format!("{v:.1}"))
            .unwrap_or_default();
        table.row(vec![time, format!("{:.1}", point.value), mem]);
    }
    if !table.is_empty() {
        println!();
        print!("{}", table.render());
    }
}

fn backup_fields(b: &v1::Backup) -> String {
    let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    fields(&[
        ("name", b.name.clone()),
        ("state", short(b.state().as_str_name(), "BACKUP_STATE_")),
        ("description", b.description.clone()),
        ("size bytes", b.size_bytes.to_string()),
        ("created", output::time(b.create_time.as_ref())),
        ("expires", output::time(b.expire_time.as_ref())),
        ("database", b.database_dump_uri.clone()),
        ("content", b.content_archive_uri.clone()),
        ("labels", labels.join(", ")),
        ("etag", b.etag.clone()),
    ])
}

/// `tenant/instance` → `tenants/tenant/instances/instance`; anything else is sent as
/// given, for the server to judge.
pub fn instance_name(arg: &str) -> String {
    let arg = arg.trim();
    if !arg.starts_with("tenants/")
        && let Some((tenant, instance)) = arg.split_once('/')
        && !instance.contains('/')
    {
        return format!("tenants/{tenant}/instances/{instance}");
    }
    arg.to_owned()
}

/// `ID` → `operations/ID`; anything else as given.
pub fn operation_name(arg: &str) -> String {
    let arg = arg.trim();
    if arg.contains('/') {
        arg.to_owned()
    } else {
        format!("operations/{arg}")
    }
}

/// The parent and instance id of a create: `tenants/T/instances/I` → (`tenants/T`, `I`),
/// `tenants/T` → (`tenants/T`, "") for a generated id.
pub fn split_create_name(arg: &str) -> (String, String) {
    let name = instance_name(arg);
    match name.split_once("/instances/") {
        Some((parent, id)) => (parent.to_owned(), id.to_owned()),
        None => (name, String::new()),
    }
}

fn parse_enum(
    value: &str,
    prefix: &str,
    lookup: fn(&str) -> Option<i32>,
    choices: &str,
) -> Result<i32, String> {
    let upper = value.trim().to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    match lookup(&full) {
        Some(v) if v != 0 => Ok(v),
        _ => Err(format!("expected one of {choices}")),
    }
}

fn parse_environment(value: &str) -> Result<i32, String> {
    parse_enum(
        value,
        "ENVIRONMENT_",
        |s| v1::Environment::from_str_name(s).map(|e| e as i32),
        "dev, sit, prod",
    )
}

fn parse_tier(value: &str) -> Result<i32, String> {
    parse_enum(
        value,
        "TIER_",
        |s| v1::Tier::from_str_name(s).map(|e| e as i32),
        "basic, standard, premium",
    )
}

fn parse_state(value: &str) -> Result<i32, String> {
    parse_enum(
        value,
        "INSTANCE_STATE_",
        |s| v1::InstanceState::from_str_name(s).map(|e| e as i32),
        "pending_provisioning, provisioning, active, scaling, restarting, updating, suspending, \
         suspended, resuming, restoring, pending_deprovisioning, deprovisioning, deprovisioned, \
         failed",
    )
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".to_owned())
}

/// `90s`, `30m`, `6h`, `2d`, or a number of seconds.
fn parse_seconds(value: &str) -> Result<i64, String> {
    let value = value.trim();
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let number: i64 = number
        .parse()
        .map_err(|_| "expected a duration such as 90s, 30m, 6h or 2d".to_owned())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("the unit must be s, m, h or d".into()),
    };
    number
        .checked_mul(unit)
        .filter(|s| *s <= 10 * 365 * 86_400)
        .ok_or_else(|| "too long".to_owned())
}

fn parse_duration(value: &str) -> Result<prost_types::Duration, String> {
    Ok(prost_types::Duration {
        seconds: parse_seconds(value)?,
        nanos: 0,
    })
}

/// RFC 3339, or an age (`15m`: fifteen minutes ago).
fn parse_time(value: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(timestamp) = value.trim().parse::<prost_types::Timestamp>() {
        return Ok(timestamp);
    }
    let age = parse_seconds(value)
        .map_err(|_| "expected an RFC 3339 time (2026-12-01T10:00:00Z) or an age (15m, 2h)")?;
    let now = std::time::SystemTime::now();
    let then = now
        .checked_sub(std::time::Duration::from_secs(
            u64::try_from(age).unwrap_or(0),
        ))
        .unwrap_or(std::time::UNIX_EPOCH);
    Ok(prost_types::Timestamp::from(then))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand_and_bad_ones_pass_through() {
        assert_eq!(instance_name("acme/wp"), "tenants/acme/instances/wp");
        assert_eq!(
            instance_name("tenants/acme/instances/wp"),
            "tenants/acme/instances/wp"
        );
        assert_eq!(instance_name("a;drop"), "a;drop");
        assert_eq!(instance_name("a/b/c"), "a/b/c");
        assert_eq!(operation_name("abc"), "operations/abc");
        assert_eq!(operation_name("operations/abc"), "operations/abc");
        assert_eq!(
            split_create_name("acme/wp"),
            ("tenants/acme".into(), "wp".into())
        );
        assert_eq!(
            split_create_name("tenants/acme"),
            ("tenants/acme".into(), String::new())
        );
        assert_eq!(
            split_create_name("tenants/a;drop/instances/wp"),
            ("tenants/a;drop".into(), "wp".into())
        );
    }

    #[test]
    fn flag_values_parse() {
        assert_eq!(parse_environment("dev"), Ok(v1::Environment::Dev as i32));
        assert_eq!(parse_environment("PROD"), Ok(v1::Environment::Prod as i32));
        assert!(parse_environment("unspecified").is_err());
        assert!(parse_environment("qa").is_err());
        assert_eq!(parse_state("active"), Ok(v1::InstanceState::Active as i32));
        assert_eq!(
            parse_state("pending-provisioning"),
            Ok(v1::InstanceState::PendingProvisioning as i32)
        );
        assert_eq!(parse_seconds("90"), Ok(90));
        assert_eq!(parse_seconds("30m"), Ok(1800));
        assert_eq!(parse_seconds("2d"), Ok(172_800));
        assert!(parse_seconds("5w").is_err());
        assert!(parse_seconds("").is_err());
        assert!(parse_seconds("99999999999999999999d").is_err());
        assert_eq!(
            parse_time("2026-12-01T10:00:00Z").unwrap().seconds,
            1_796_119_200
        );
        assert!(parse_time("15m").is_ok());
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("ab").is_err());
    }

    #[test]
    fn custom_domains_repeat_and_clear() {
        use clap::Parser;
        #[derive(Parser)]
        struct Update {
            #[command(flatten)]
            args: UpdateArgs,
        }
        let parsed = Update::try_parse_from([
            "update",
            "acme/wp",
            "--custom-domain",
            "www.acme.example",
            "--custom-domain",
            "shop.acme.example",
        ])
        .unwrap();
        assert_eq!(
            parsed.args.custom_domains,
            vec!["www.acme.example", "shop.acme.example"]
        );
        assert!(!parsed.args.clear_custom_domains);
        let cleared =
            Update::try_parse_from(["update", "acme/wp", "--clear-custom-domains"]).unwrap();
        assert!(cleared.args.clear_custom_domains && cleared.args.custom_domains.is_empty());
        assert!(
            Update::try_parse_from([
                "update",
                "acme/wp",
                "--clear-custom-domains",
                "--custom-domain",
                "www.acme.example"
            ])
            .is_err()
        );
    }
}
