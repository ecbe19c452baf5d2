//! Custom domains (issue 14): per domain an ACM certificate validated through DNS, on the
//! instance's listener (SNI), and the host on the instance's listener rules.
//!
//! Steps:
//! - [`CUSTOM_DOMAINS`] (provisioning, last; an update that changes the domains): first the
//!   instance's reservation on its load balancer is made `need(n)` (LOAD_BALANCER_FULL when
//!   the listener lacks room, before anything is requested); then for every domain the
//!   instance is to have, a certificate (adopted by its owner tags, else requested with DNS
//!   validation, an idempotency token from the instance, the domain and the operation's
//!   attempt, and the domain as a tag). Its validation record is created (UPSERT) and
//!   waited for INSYNC when a managed zone of the platform holds the domain; otherwise it is
//!   written on the instance (`dns_records`, not managed) for the customer to create. The
//!   instance record is written (a versioned `UpdateInstance` of the statuses and records
//!   only) on every pass, so
//!   GetInstance shows the record and the PENDING_VALIDATION status WHILE the step waits.
//!   The step waits (NotYet) while a certificate is PENDING_VALIDATION, for at most the
//!   platform's `certificate_validation_timeout_secs` from the attempt's start; FAILED,
//!   VALIDATION_TIMED_OUT, REVOKED or EXPIRED make that domain FAILED with ACM's reason.
//!   When the bound passes with certificates still pending, the operation goes on and
//!   completes with those domains PENDING_VALIDATION (a customer who has not created a
//!   record yet does not roll back a whole instance); UpdateInstance with the same
//!   `custom_domains` later runs the step again and resumes. Then each ISSUED certificate
//!   is added to the listener, the rules are made to route the platform host and every
//!   domain (`sync_listener_rules`), and for a managed zone the
//!   domain's alias record to the load balancer is created; for other zones the traffic
//!   record is shown for the customer.
//! - [`REMOVE_CUSTOM_DOMAINS`] (an update that removes domains; deprovisioning): for each
//!   domain the instance no longer has — the hosts are out of the rules already (the update's
//!   [`CUSTOM_DOMAINS`] step, or deprovisioning's rule removal, ran first) — its certificate
//!   off the listener, the certificate deleted (ACM refuses while ELB still holds it:
//!   Retryable, tried again within the operation's deadline), its managed records deleted,
//!   and its statuses and records gone from the instance.
//!
//! The undo of [`CUSTOM_DOMAINS`] (a failed provisioning or update) removes what it made for
//! the domains the operation added: hosts out of the rules first, then as above, and gives
//! back the room it reserved.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cloud::{CertificateSpec, CertificateStatus, Tags};
use crate::domain::{CustomDomainInfo, DnsPurpose, DnsRecordInfo, DomainState, Instance, Verb};
use crate::store::{StoreError, Write};

use super::placement::{self, need};
use super::provision;
use super::{StepCtx, StepError, StepResult};

/// Ensures the certificates, validation, listener certificates, routing and records of the
/// instance's custom domains.
pub const CUSTOM_DOMAINS: &str = "custom_domains";
/// Removes what belonged to domains the instance no longer has.
pub const REMOVE_CUSTOM_DOMAINS: &str = "remove_custom_domains";

/// How long a certificate may stay PENDING_VALIDATION before the operation goes on without
/// it, unless the platform sets `certificate_validation_timeout_secs`.
pub const DEFAULT_VALIDATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// ACM statuses after which a certificate will never be issued.
const DEAD: [&str; 4] = ["FAILED", "VALIDATION_TIMED_OUT", "REVOKED", "EXPIRED"];

/// The tag (under the deployment's prefix) naming the custom domain a certificate is for.
pub fn domain_tag_key(ctx: &StepCtx) -> String {
    format!("{}:custom-domain", ctx.tag_settings.prefix)
}

/// The domains the operation leaves the instance with: an update's new spec, else the
/// instance's.
pub fn target_domains(ctx: &StepCtx) -> Vec<String> {
    if ctx.operation.verb == Verb::Update
        && let Some(domains) = ctx.operation.params["spec"].get("custom_domains")
    {
        return serde_json::from_value(domains.clone()).unwrap_or_default();
    }
    if ctx.operation.verb == Verb::Delete {
        return Vec::new();
    }
    ctx.instance.spec.custom_domains.clone()
}

/// The domains the instance had before the operation (none for a provisioning).
pub fn previous_domains(ctx: &StepCtx) -> Vec<String> {
    match ctx.operation.verb {
        Verb::Create => Vec::new(),
        Verb::Update => serde_json::from_value(ctx.operation.params["previous_domains"].clone())
            .unwrap_or_else(|_| ctx.instance.spec.custom_domains.clone()),
        _ => ctx.instance.spec.custom_domains.clone(),
    }
}

/// RequestCertificate's idempotency token for this instance, domain and attempt of the
/// operation: 32 hex characters (ACM: at most 32 word characters). ACM answers a token it
/// has seen within the hour with the certificate it made then, even one deleted since, so a
/// domain removed (or rolled back) and added again by a later operation or attempt needs a
/// token of its own; an attempt resumed after a crash keeps its token (and its certificate).
pub fn idempotency_token(ctx: &StepCtx, domain: &str) -> String {
    let digest = Sha256::digest(
        format!(
            "{}|{domain}|{}|{}",
            ctx.instance.name, ctx.operation.id, ctx.operation.attempt
        )
        .as_bytes(),
    );
    hex::encode(digest)[..32].to_owned()
}

fn certificate_spec(ctx: &StepCtx, domain: &str) -> CertificateSpec {
    let mut tags = ctx.tags("certificate");
    tags.push((domain_tag_key(ctx), domain.to_owned()));
    CertificateSpec {
        domain: domain.to_owned(),
        idempotency_token: idempotency_token(ctx, domain),
        tags,
    }
}

/// The tags that find this instance's certificate(s) for `domain`.
fn certificate_tags(ctx: &StepCtx, domain: &str) -> Tags {
    let mut tags = ctx.component_tags("certificate");
    tags.push((domain_tag_key(ctx), domain.to_owned()));
    tags
}

fn validation_timeout(ctx: &StepCtx) -> Duration {
    ctx.cloud
        .platform
        .certificate_validation_timeout_secs
        .map_or(DEFAULT_VALIDATION_TIMEOUT, |secs| {
            Duration::from_secs(u64::from(secs))
        })
}

/// Whether the bound on waiting for validation has passed (counted from the attempt's start
/// on the engine's clock).
fn validation_bound_passed(ctx: &StepCtx) -> bool {
    let started = ctx
        .operation
        .params
        .get("attempt_started_at")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(ctx.operation.created_at.millis());
    let bound = i64::try_from(validation_timeout(ctx).as_millis()).unwrap_or(i64::MAX);
    ctx.now.millis() >= started.saturating_add(bound)
}

/// What one pass found for one domain.
struct Found {
    info: CustomDomainInfo,
    records: Vec<DnsRecordInfo>,
}

/// The state of a certificate as the instance shows it.
fn domain_state(status: &CertificateStatus) -> (DomainState, String) {
    match status.status.as_str() {
        "ISSUED" => (DomainState::Active, String::new()),
        dead if DEAD.contains(&dead) => {
            let reason = status
                .failure_reason
                .clone()
                .unwrap_or_else(|| "no reason given".into());
            (
                DomainState::Failed,
                format!(
                    "ACM: the certificate is {dead} ({reason}); remove the domain and add it again to request a new one"
                ),
            )
        }
        other => (
            DomainState::PendingValidation,
            format!(
                "ACM: the certificate is {other}; it is issued once the validation record resolves"
            ),
        ),
    }
}

/// Runs [`CUSTOM_DOMAINS`]. Returns the certificate ARNs joined with ','.
pub async fn ensure(ctx: &StepCtx) -> StepResult<String> {
    let domains = target_domains(ctx);
    // Room first: a load balancer that cannot take the domains refuses before anything is
    // requested for them.
    placement::reserve(ctx, need(domains.len())).await?;
    let mut found = Vec::with_capacity(domains.len());
    for domain in &domains {
        found.push(certificate_of(ctx, domain).await?);
    }
    let pending: Vec<&str> = found
        .iter()
        .filter(|f| f.info.state == DomainState::PendingValidation)
        .map(|f| f.info.domain.as_str())
        .collect();
    let waiting = !pending.is_empty() && !validation_bound_passed(ctx);
    if waiting {
        // Shown now, while the operation waits.
        let detail = format!(
            "waiting for ACM to issue the certificate(s) of {}",
            pending.join(", ")
        );
        record(ctx, &domains, &found, &[], None).await?;
        return Err(StepError::NotYet(detail));
    }
    let lb = placement::load_balancer_of(ctx)?;
    for f in found.iter().filter(|f| f.info.state == DomainState::Active) {
        ctx.cloud
            .routing
            .add_listener_certificate(&lb.listener_arn, &f.info.certificate_arn)
            .await?;
    }
    let rules =
        provision::sync_listener_rules(ctx, &provision::routed_hosts(ctx, &domains)).await?;
    let mut traffic = Vec::with_capacity(domains.len());
    for domain in &domains {
        traffic.push(traffic_record(ctx, domain, &lb).await?);
    }
    record(ctx, &domains, &found, &traffic, Some(&rules)).await?;
    if !pending.is_empty() {
        tracing::warn!(domains = ?pending, "certificates still pending validation; the operation goes on without them");
    }
    Ok(found
        .iter()
        .map(|f| f.info.certificate_arn.clone())
        .collect::<Vec<_>>()
        .join(","))
}

/// The certificate of `domain` (requested if need be), its validation record (created in a
/// managed zone) and where it stands.
async fn certificate_of(ctx: &StepCtx, domain: &str) -> StepResult<Found> {
    let cloud = &ctx.cloud;
    let arn = cloud
        .certificates
        .ensure_certificate(&certificate_spec(ctx, domain))
        .await?;
    // ACM is eventually consistent: a certificate just requested may not be described yet.
    let Some(status) = cloud.certificates.certificate(&arn).await? else {
        return Err(StepError::NotYet(format!(
            "ACM does not describe the certificate of {domain} yet"
        )));
    };
    let (state, message) = domain_state(&status);
    let mut records = Vec::new();
    if let Some(validation) = &status.validation {
        let managed = cloud.platform.managed_zone_of(domain).cloned();
        let in_sync = match (&managed, state) {
            // Kept while the certificate lives: ACM's managed renewal validates with it
            // again.
            (Some(zone), _) => {
                let change = cloud
                    .dns
                    .upsert_record(
                        &zone.hosted_zone_id,
                        &validation.name,
                        &validation.record_type,
                        &validation.value,
                    )
                    .await?;
                cloud.dns.change_in_sync(&change).await?
            }
            // The customer's: it resolves, as far as we know, once ACM issued.
            (None, state) => state == DomainState::Active,
        };
        records.push(DnsRecordInfo {
            name: validation.name.clone(),
            record_type: validation.record_type.clone(),
            value: validation.value.clone(),
            purpose: DnsPurpose::CertificateValidation,
            managed: managed.is_some(),
            in_sync,
        });
    } else if state == DomainState::PendingValidation {
        return Err(StepError::NotYet(format!(
            "ACM has not made the validation record of {domain} yet"
        )));
    }
    Ok(Found {
        info: CustomDomainInfo {
            domain: domain.to_owned(),
            state,
            certificate_arn: arn,
            message,
        },
        records,
    })
}

/// The record that sends `domain`'s traffic to the load balancer: created (an alias) in a
/// managed zone, else shown for the customer (a CNAME; at a zone apex their provider's
/// ALIAS/ANAME).
async fn traffic_record(
    ctx: &StepCtx,
    domain: &str,
    lb: &crate::cloud::LoadBalancer,
) -> StepResult<DnsRecordInfo> {
    let dns_name = if lb.dns_name.is_empty() {
        ctx.instance
            .load_balancer
            .as_ref()
            .map(|p| p.dns_name.clone())
            .unwrap_or_default()
    } else {
        lb.dns_name.clone()
    };
    match ctx.cloud.platform.managed_zone_of(domain) {
        Some(zone) if !dns_name.is_empty() => {
            let change = ctx
                .cloud
                .dns
                .upsert_alias(&zone.hosted_zone_id, domain, &dns_name, &lb.hosted_zone_id)
                .await?;
            let in_sync = ctx.cloud.dns.change_in_sync(&change).await?;
            Ok(DnsRecordInfo {
                name: domain.to_owned(),
                record_type: "A".into(),
                value: dns_name,
                purpose: DnsPurpose::Traffic,
                managed: true,
                in_sync,
            })
        }
        _ => Ok(DnsRecordInfo {
            name: domain.to_owned(),
            record_type: "CNAME".into(),
            value: dns_name,
            purpose: DnsPurpose::Traffic,
            managed: false,
            in_sync: false,
        }),
    }
}

/// Writes the domains' statuses and records on the instance (the rest of the record as
/// stored), conditional on the version read; a concurrent write is read again.
async fn record(
    ctx: &StepCtx,
    domains: &[String],
    found: &[Found],
    traffic: &[DnsRecordInfo],
    rules: Option<&str>,
) -> StepResult<()> {
    let statuses: Vec<CustomDomainInfo> = found.iter().map(|f| f.info.clone()).collect();
    let mut records: Vec<DnsRecordInfo> = found.iter().flat_map(|f| f.records.clone()).collect();
    records.extend(traffic.iter().cloned());
    write_instance(ctx, |instance| {
        keep_only(instance, domains);
        instance.custom_domain_statuses = statuses.clone();
        record_certificates(instance);
        instance.dns_records.extend(records.iter().cloned());
        // Suspension, resumption and drift checks act on every recorded rule.
        if let Some(rules) = rules
            && instance.resources.contains_key(provision::LISTENER_RULE)
        {
            instance
                .resources
                .insert(provision::LISTENER_RULE.to_owned(), rules.to_owned());
        }
    })
    .await
}

/// Drops the statuses and records of custom domains other than `keep` (the platform host's
/// own record stays), and every validation record (each pass writes them again).
fn keep_only(instance: &mut Instance, keep: &[String]) {
    let known: Vec<String> = instance
        .custom_domain_statuses
        .iter()
        .map(|s| s.domain.clone())
        .chain(keep.iter().cloned())
        .collect();
    instance
        .custom_domain_statuses
        .retain(|s| keep.contains(&s.domain));
    record_certificates(instance);
    instance.dns_records.retain(|r| match r.purpose {
        DnsPurpose::CertificateValidation => false,
        DnsPurpose::Traffic => !known.contains(&r.name),
    });
}

/// The instance's `custom_domains` resource: its certificates' ARNs joined with ',' (what
/// provisioning's step recorded), kept current as domains come and go.
fn record_certificates(instance: &mut Instance) {
    let arns: Vec<&str> = instance
        .custom_domain_statuses
        .iter()
        .map(|s| s.certificate_arn.as_str())
        .filter(|arn| !arn.is_empty())
        .collect();
    if arns.is_empty() {
        instance.resources.remove(CUSTOM_DOMAINS);
    } else {
        instance
            .resources
            .insert(CUSTOM_DOMAINS.to_owned(), arns.join(","));
    }
}

/// Applies `edit` to the stored instance with a versioned write.
async fn write_instance(ctx: &StepCtx, edit: impl Fn(&mut Instance)) -> StepResult<()> {
    for _ in 0..5 {
        let Some(mut instance) = ctx.store.get_instance(&ctx.instance.name).await? else {
            return Err(StepError::Fatal(format!(
                "{} is no longer in the store",
                ctx.instance.name
            )));
        };
        let before = instance.clone();
        edit(&mut instance);
        if instance == before {
            return Ok(());
        }
        match ctx
            .store
            .commit(vec![Write::UpdateInstance(instance)])
            .await
        {
            Ok(()) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(StepError::Transient(
        "the instance record kept changing while its domains were written".into(),
    ))
}

/// Runs [`REMOVE_CUSTOM_DOMAINS`]: removes what belongs to domains the operation does not
/// leave the instance with (an update's removed ones; every one at deprovisioning).
pub async fn remove_dropped(ctx: &StepCtx) -> StepResult<()> {
    let keep = target_domains(ctx);
    let mut dropped = previous_domains(ctx);
    // Certificates of this instance for any other domain (a crash between request and
    // record, an earlier failed update) go too.
    for certificate in ctx
        .cloud
        .certificates
        .tagged_certificates(&ctx.component_tags("certificate"))
        .await?
    {
        let key = domain_tag_key(ctx);
        if let Some((_, domain)) = certificate.tags.iter().find(|(k, _)| *k == key)
            && !dropped.contains(domain)
        {
            dropped.push(domain.clone());
        }
    }
    dropped.retain(|domain| !keep.contains(domain));
    remove_domains(ctx, &dropped, &keep).await
}

/// The undo of [`CUSTOM_DOMAINS`]: the domains the operation added go (hosts out of the
/// rules first), the room reserved is given back.
pub async fn undo_ensure(ctx: &StepCtx) -> StepResult<()> {
    let previous = previous_domains(ctx);
    let added: Vec<String> = target_domains(ctx)
        .into_iter()
        .filter(|domain| !previous.contains(domain))
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    let mut rules = None;
    if ctx.operation.verb != Verb::Create {
        // Provisioning's rollback deletes the rules; an update's keeps them, with the
        // previous hosts.
        rules = Some(
            provision::sync_listener_rules(ctx, &provision::routed_hosts(ctx, &previous)).await?,
        );
    }
    remove_domains(ctx, &added, &previous).await?;
    if let Some(rules) = rules {
        write_instance(ctx, |instance| {
            if instance.resources.contains_key(provision::LISTENER_RULE) {
                instance
                    .resources
                    .insert(provision::LISTENER_RULE.to_owned(), rules.clone());
            }
        })
        .await?;
    }
    if ctx.operation.verb != Verb::Create {
        placement::reserve(ctx, need(previous.len())).await?;
    }
    Ok(())
}

/// Removes each of `domains` (certificate off the listener, deleted; managed records
/// deleted) and leaves the instance's statuses and records to `keep`.
async fn remove_domains(ctx: &StepCtx, domains: &[String], keep: &[String]) -> StepResult<()> {
    let cloud = &ctx.cloud;
    let mut listeners = cloud.platform.listeners();
    if let Ok(lb) = placement::load_balancer_of(ctx)
        && !listeners.contains(&lb.listener_arn)
    {
        listeners.push(lb.listener_arn);
    }
    listeners.retain(|l| !l.is_empty());
    for domain in domains {
        let certificates = cloud
            .certificates
            .tagged_certificates(&certificate_tags(ctx, domain))
            .await?;
        for certificate in &certificates {
            for listener in &listeners {
                cloud
                    .routing
                    .remove_listener_certificate(listener, &certificate.id)
                    .await?;
            }
        }
        if let Some(zone) = cloud.platform.managed_zone_of(domain) {
            // The validation record's name is ACM's; read it before the certificate goes.
            for certificate in &certificates {
                if let Some(status) = cloud.certificates.certificate(&certificate.id).await?
                    && let Some(validation) = status.validation
                {
                    cloud
                        .dns
                        .delete_record(
                            &zone.hosted_zone_id,
                            &validation.name,
                            &validation.record_type,
                        )
                        .await?;
                }
            }
            cloud
                .dns
                .delete_record(&zone.hosted_zone_id, domain, "A")
                .await?;
        }
        for certificate in &certificates {
            // Retryable while ELB still holds it: the engine tries again, bounded by the
            // operation's deadline.
            cloud
                .certificates
                .delete_certificate(&certificate.id)
                .await?;
        }
    }
    let keep = keep.to_vec();
    write_instance(ctx, |instance| keep_only(instance, &keep)).await
}

/// What of the instance's custom domains is left in AWS: certificates carrying its owner
/// tags, on any listener of the pool or not, and records in the managed zones (for
/// deprovisioning's verify step).
pub async fn leftovers(ctx: &StepCtx) -> StepResult<Vec<String>> {
    let cloud = &ctx.cloud;
    let mut left = Vec::new();
    for certificate in cloud
        .certificates
        .tagged_certificates(&ctx.component_tags("certificate"))
        .await?
    {
        left.push(format!("certificate {}", certificate.id));
    }
    let mut domains = ctx.instance.spec.custom_domains.clone();
    domains.extend(
        ctx.instance
            .custom_domain_statuses
            .iter()
            .map(|s| s.domain.clone()),
    );
    domains.sort();
    domains.dedup();
    for domain in &domains {
        if let Some(zone) = cloud.platform.managed_zone_of(domain)
            && cloud
                .dns
                .record(&zone.hosted_zone_id, domain, "A")
                .await?
                .is_some()
        {
            left.push(format!("DNS record {domain} A"));
        }
    }
    for record in ctx
        .instance
        .dns_records
        .iter()
        .filter(|r| r.managed && r.purpose == DnsPurpose::CertificateValidation)
    {
        if let Some(zone) = cloud.platform.managed_zone_of(&record.name)
            && cloud
                .dns
                .record(&zone.hosted_zone_id, &record.name, &record.record_type)
                .await?
                .is_some()
        {
            left.push(format!("DNS record {} {}", record.name, record.record_type));
        }
    }
    Ok(left)
}
