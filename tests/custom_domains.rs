//! Custom domains end to end (issue 14), on the emulated platform with the real engine:
//! certificates requested with DNS validation, the validation record on the instance while
//! the operation waits, ISSUED, the certificate on the listener, the host on a rule; four
//! domains in two rules; the same domain for another tenant ALREADY_EXISTS; removal with
//! UpdateInstance; deprovisioning leaves nothing.
//!
//! Everything is checked with the AWS SDKs directly (ACM, ELBv2, Route53), never with the
//! adapters' own reads.
//!
//! What moto does not do, and how the tests stand in for it: its ACM issues a certificate
//! 60 s after the request whether or not the validation record exists, and its
//! DeleteCertificate never refuses a certificate a listener still uses. So ACM's answers go
//! through [`GatedCertificates`], a wrapper around the real adapter that answers
//! PENDING_VALIDATION until the test "creates the record" (opens the gate), then ISSUED, and
//! refuses (Retryable, as ACM's ResourceInUseException) to delete a certificate that a
//! listener of the pool still lists — the state sequences AWS documents.

mod common;
mod platform;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_acm::types::ValidationMethod;
use instance_manager::cloud::platform::EMULATED_MANAGED_ZONE;
use instance_manager::cloud::{
    CertificateSpec, CertificateStatus, Certificates, CloudEnv, CloudError, CloudResult, ErrorKind,
    Routing, TaggedResource, Tags,
};
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use instance_manager::workflow::EngineOptions;
use platform::{CloudWrapper, ControlPlane};
use tokio::sync::Notify;
use tonic::Code;
use tonic_types::StatusExt;

/// What the test controls of ACM's answers, shared by every wrapped `CloudEnv`.
#[derive(Default)]
struct Gate {
    /// The customer created the validation records: ACM issues.
    open: AtomicBool,
    /// Reads of a certificate answered PENDING_VALIDATION.
    pending_reads: AtomicUsize,
    /// Told once a second pending read happened (the step's first pass has written the
    /// instance and is polling again).
    waiting: Notify,
    /// DeleteCertificate calls refused because a listener still held the certificate.
    refused_deletes: AtomicUsize,
}

/// The real ACM adapter, with the status and the in-use refusal of AWS (see the module
/// docs).
struct GatedCertificates {
    inner: Arc<dyn Certificates>,
    routing: Arc<dyn Routing>,
    listeners: Vec<String>,
    gate: Arc<Gate>,
}

#[async_trait]
impl Certificates for GatedCertificates {
    async fn ensure_certificate(&self, spec: &CertificateSpec) -> CloudResult<String> {
        self.inner.ensure_certificate(spec).await
    }

    async fn certificate(&self, arn: &str) -> CloudResult<Option<CertificateStatus>> {
        let Some(mut status) = self.inner.certificate(arn).await? else {
            return Ok(None);
        };
        if self.gate.open.load(Ordering::SeqCst) {
            status.status = "ISSUED".into();
        } else {
            status.status = "PENDING_VALIDATION".into();
            if self.gate.pending_reads.fetch_add(1, Ordering::SeqCst) + 1 >= 2 {
                self.gate.waiting.notify_one();
            }
        }
        Ok(Some(status))
    }

    async fn delete_certificate(&self, arn: &str) -> CloudResult<()> {
        for listener in &self.listeners {
            if self
                .routing
                .listener_certificates(listener)
                .await?
                .iter()
                .any(|c| c == arn)
            {
                self.gate.refused_deletes.fetch_add(1, Ordering::SeqCst);
                return Err(CloudError::new(
                    ErrorKind::Retryable,
                    format!("acm:DeleteCertificate: ResourceInUseException: {arn} is in use"),
                ));
            }
        }
        self.inner.delete_certificate(arn).await
    }

    async fn tagged_certificates(&self, tags: &Tags) -> CloudResult<Vec<TaggedResource>> {
        self.inner.tagged_certificates(tags).await
    }
}

fn gated(gate: Arc<Gate>) -> CloudWrapper {
    Arc::new(move |mut cloud: CloudEnv| {
        cloud.certificates = Arc::new(GatedCertificates {
            inner: cloud.certificates.clone(),
            routing: cloud.routing.clone(),
            listeners: cloud.platform.listeners(),
            gate: gate.clone(),
        });
        cloud
    })
}

async fn start(gate: Arc<Gate>, validation_timeout_secs: Option<u32>) -> ControlPlane {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.environments[0]
        .platform
        .certificate_validation_timeout_secs = validation_timeout_secs;
    platform::start_with(
        config,
        EngineOptions::default(),
        |store| store,
        Some(gated(gate)),
    )
    .await
}

fn create_with(tenant: &str, domains: &[&str]) -> v1::CreateInstanceRequest {
    let mut request = platform::create_request(tenant, "wp", v1::Environment::Dev);
    request.instance.as_mut().unwrap().custom_domains =
        domains.iter().map(|d| d.to_string()).collect();
    request
}

fn update_domains(tenant: &str, domains: &[String]) -> v1::UpdateInstanceRequest {
    v1::UpdateInstanceRequest {
        instance: Some(v1::Instance {
            name: format!("tenants/{tenant}/instances/wp"),
            custom_domains: domains.to_vec(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["custom_domains".into()],
        }),
        request_id: String::new(),
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
        .reason
}

/// The AWS view of one account, through the SDKs.
struct Aws {
    acm: aws_sdk_acm::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    route53: aws_sdk_route53::Client,
}

impl Aws {
    async fn of(cp: &ControlPlane) -> Self {
        let cloud = cp.cloud(Environment::Dev).await;
        let sdk = platform::account_sdk(&cloud).await;
        Self {
            acm: aws_sdk_acm::Client::new(&sdk),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            route53: aws_sdk_route53::Client::new(&sdk),
        }
    }

    /// Every certificate in the account (a fresh one per test) but the platform's own
    /// wildcard (the listeners' default): ARN → domain.
    async fn certificates(&self) -> Vec<(String, String)> {
        let listed = self.acm.list_certificates().send().await.unwrap();
        listed
            .certificate_summary_list()
            .iter()
            .filter(|c| !c.domain_name().unwrap_or_default().starts_with("*."))
            .map(|c| {
                (
                    c.certificate_arn().unwrap_or_default().to_owned(),
                    c.domain_name().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The listener's certificates besides its default one.
    async fn listener_certificates(&self, listener: &str) -> Vec<String> {
        let answer = self
            .elb
            .describe_listener_certificates()
            .listener_arn(listener)
            .send()
            .await
            .unwrap();
        answer
            .certificates()
            .iter()
            .filter(|c| c.is_default() != Some(true))
            .filter_map(|c| c.certificate_arn().map(str::to_owned))
            .collect()
    }

    /// The host-header values of each non-default rule of the listener.
    async fn rule_hosts(&self, listener: &str) -> Vec<Vec<String>> {
        let answer = self
            .elb
            .describe_rules()
            .listener_arn(listener)
            .send()
            .await
            .unwrap();
        answer
            .rules()
            .iter()
            .filter(|r| r.is_default() != Some(true))
            .map(|rule| {
                rule.conditions()
                    .iter()
                    .filter(|c| c.field() == Some("host-header"))
                    .flat_map(|c| {
                        let mut values: Vec<String> = c
                            .host_header_config()
                            .map(|h| h.values().to_vec())
                            .unwrap_or_default();
                        if values.is_empty() {
                            values = c.values().to_vec();
                        }
                        values
                    })
                    .collect()
            })
            .collect()
    }

    /// Record sets of the managed zone: (name without the dot, type).
    async fn managed_records(&self, zone_id: &str) -> Vec<(String, String)> {
        let answer = self
            .route53
            .list_resource_record_sets()
            .hosted_zone_id(zone_id)
            .send()
            .await
            .unwrap();
        answer
            .resource_record_sets()
            .iter()
            .map(|r| {
                (
                    r.name().trim_end_matches('.').to_owned(),
                    r.r#type().as_str().to_owned(),
                )
            })
            .filter(|(_, kind)| kind != "NS" && kind != "SOA")
            .collect()
    }
}

fn managed_zone_id(cp: &ControlPlane) -> String {
    cp.config.environments[0]
        .platform
        .managed_zones
        .iter()
        .find(|z| z.domain == EMULATED_MANAGED_ZONE)
        .expect("the emulated platform manages a customer zone")
        .hosted_zone_id
        .clone()
}

fn state_of(instance: &v1::Instance, domain: &str) -> v1::custom_domain_status::State {
    instance
        .custom_domain_statuses
        .iter()
        .find(|s| s.domain == domain)
        .unwrap_or_else(|| panic!("no status for {domain}: {instance:#?}"))
        .state()
}

#[tokio::test]
async fn custom_domains_from_request_to_removal() {
    let gate = Arc::new(Gate::default());
    let mut cp = start(gate.clone(), None).await;
    let aws = Aws::of(&cp).await;
    let tenant = platform::tenant("cdom");
    let www = format!("www.{tenant}.example.org");

    // Create with one domain of the customer's own zone (given in upper case).
    let accepted = cp
        .instances
        .create_instance(create_with(&tenant, &[&www.to_uppercase()]))
        .await
        .unwrap()
        .into_inner();

    // The same domain for another tenant is refused at once, whatever its case.
    let other = platform::tenant("cdom-b");
    for spelling in [www.clone(), www.to_uppercase()] {
        let refused = cp
            .instances
            .create_instance(create_with(&other, &[&spelling]))
            .await
            .expect_err("a domain another tenant holds");
        assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
        assert_eq!(reason(&refused), "DOMAIN_TAKEN");
        assert!(
            !refused.message().contains(&format!("tenants/{tenant}")),
            "the holder is not named: {refused:?}"
        );
    }

    // While the operation waits for ACM, the instance shows the validation record the
    // customer must create, and the domain PENDING_VALIDATION.
    tokio::time::timeout(Duration::from_secs(120), gate.waiting.notified())
        .await
        .expect("the custom_domains step polls ACM");
    let waiting = cp.instance(&tenant).await;
    assert_eq!(waiting.custom_domains, vec![www.clone()]);
    assert_eq!(
        state_of(&waiting, &www),
        v1::custom_domain_status::State::PendingValidation
    );
    let validation: Vec<&v1::DnsRecord> = waiting
        .dns_records
        .iter()
        .filter(|r| r.purpose() == v1::dns_record::Purpose::CertificateValidation)
        .collect();
    assert_eq!(validation.len(), 1, "{:#?}", waiting.dns_records);
    assert_eq!(validation[0].r#type, "CNAME");
    assert!(
        validation[0].name.ends_with(&format!(".{www}")),
        "{validation:?}"
    );
    assert!(!validation[0].managed && !validation[0].in_sync);

    // ACM's view: one certificate, for the domain, DNS validation, tagged with the instance,
    // and its validation record is the one shown.
    let certificates = aws.certificates().await;
    assert_eq!(certificates.len(), 1, "{certificates:?}");
    let (arn, domain) = certificates[0].clone();
    assert_eq!(domain, www);
    let described = aws
        .acm
        .describe_certificate()
        .certificate_arn(&arn)
        .send()
        .await
        .unwrap();
    let certificate = described.certificate().unwrap();
    let options = certificate.domain_validation_options();
    assert_eq!(options.len(), 1);
    assert_eq!(options[0].validation_method(), Some(&ValidationMethod::Dns));
    let record = options[0].resource_record().unwrap();
    assert_eq!(record.name().trim_end_matches('.'), validation[0].name);
    assert_eq!(record.value().trim_end_matches('.'), validation[0].value);
    let tags = aws
        .acm
        .list_tags_for_certificate()
        .certificate_arn(&arn)
        .send()
        .await
        .unwrap();
    let tag = |key: &str| {
        tags.tags()
            .iter()
            .find(|t| t.key() == key)
            .and_then(|t| t.value().map(str::to_owned))
    };
    assert_eq!(tag("bbws:tenant-id"), Some(tenant.clone()));
    assert_eq!(tag("bbws:instance-id"), Some("wp".to_owned()));
    assert_eq!(tag("bbws:custom-domain"), Some(www.clone()));

    // The customer creates the record: ACM issues, the operation completes.
    gate.open.store(true, Ordering::SeqCst);
    cp.completed(&accepted.name).await;
    let active = cp.instance(&tenant).await;
    assert_eq!(active.state(), v1::InstanceState::Active);
    assert_eq!(
        state_of(&active, &www),
        v1::custom_domain_status::State::Active
    );
    let status = &active.custom_domain_statuses[0];
    assert_eq!(status.certificate_arn, arn);
    let listener = active.load_balancer.as_ref().unwrap().listener_arn.clone();
    assert!(!listener.is_empty());
    let traffic = active
        .dns_records
        .iter()
        .find(|r| r.name == www && r.purpose() == v1::dns_record::Purpose::Traffic)
        .unwrap_or_else(|| panic!("no traffic record: {:#?}", active.dns_records));
    assert!(!traffic.managed);
    assert_eq!(
        traffic.value,
        active.load_balancer.as_ref().unwrap().dns_name
    );
    // On the listener (SNI), and routed.
    assert_eq!(
        aws.listener_certificates(&listener).await,
        vec![arn.clone()]
    );
    let platform_host = format!("{tenant}.dev.{}", platform::DOMAIN);
    assert_eq!(
        aws.rule_hosts(&listener).await,
        vec![vec![platform_host.clone(), www.clone()]]
    );

    // Three more, one in a zone we manage: five hosts in two rules (3 + 2), four
    // certificates; the managed domain's validation and alias records are ours to create.
    let managed = format!("{tenant}.{EMULATED_MANAGED_ZONE}");
    let four = vec![
        www.clone(),
        format!("shop.{tenant}.example.org"),
        managed.clone(),
        format!("blog.{tenant}.example.org"),
    ];
    let update = cp
        .instances
        .update_instance(update_domains(&tenant, &four))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&update.name).await;
    let grown = cp.instance(&tenant).await;
    assert_eq!(grown.custom_domains, four);
    for domain in &four {
        assert_eq!(
            state_of(&grown, domain),
            v1::custom_domain_status::State::Active
        );
    }
    let mut rules = aws.rule_hosts(&listener).await;
    rules.sort_by_key(|hosts| std::cmp::Reverse(hosts.len()));
    let mut expected_hosts = vec![platform_host.clone()];
    expected_hosts.extend(four.iter().cloned());
    assert_eq!(
        rules.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 2],
        "{rules:?}"
    );
    let mut routed: Vec<String> = rules.concat();
    routed.sort();
    expected_hosts.sort();
    assert_eq!(routed, expected_hosts);
    let certificates = aws.certificates().await;
    assert_eq!(certificates.len(), 4, "{certificates:?}");
    let mut on_listener = aws.listener_certificates(&listener).await;
    on_listener.sort();
    let mut all: Vec<String> = certificates.iter().map(|(arn, _)| arn.clone()).collect();
    all.sort();
    assert_eq!(on_listener, all);
    let zone = managed_zone_id(&cp);
    let records = aws.managed_records(&zone).await;
    assert!(
        records.contains(&(managed.clone(), "A".to_owned())),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|(name, kind)| kind == "CNAME" && name.ends_with(&format!(".{managed}"))),
        "{records:?}"
    );
    let managed_validation = grown
        .dns_records
        .iter()
        .find(|r| {
            r.purpose() == v1::dns_record::Purpose::CertificateValidation
                && r.name.ends_with(&format!(".{managed}"))
        })
        .unwrap();
    assert!(managed_validation.managed);

    // Remove two, the managed one among them: their certificates off the listener and
    // deleted (not before ELB let go of them), their hosts off the rules, the managed
    // records deleted.
    let kept = vec![www.clone(), format!("blog.{tenant}.example.org")];
    let removed_arns: Vec<String> = grown
        .custom_domain_statuses
        .iter()
        .filter(|s| !kept.contains(&s.domain))
        .map(|s| s.certificate_arn.clone())
        .collect();
    let shrink = cp
        .instances
        .update_instance(update_domains(&tenant, &kept))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&shrink.name).await;
    let shrunk = cp.instance(&tenant).await;
    assert_eq!(shrunk.custom_domains, kept);
    assert_eq!(shrunk.custom_domain_statuses.len(), 2);
    for arn in &removed_arns {
        let gone = aws
            .acm
            .describe_certificate()
            .certificate_arn(arn)
            .send()
            .await;
        assert!(gone.is_err(), "{arn} still exists");
    }
    assert_eq!(aws.certificates().await.len(), 2);
    let on_listener = aws.listener_certificates(&listener).await;
    assert_eq!(on_listener.len(), 2);
    assert!(removed_arns.iter().all(|arn| !on_listener.contains(arn)));
    let mut routed = aws.rule_hosts(&listener).await.concat();
    routed.sort();
    let mut expected = vec![platform_host.clone()];
    expected.extend(kept.iter().cloned());
    expected.sort();
    assert_eq!(routed, expected);
    assert_eq!(aws.rule_hosts(&listener).await.len(), 1);
    assert_eq!(aws.managed_records(&zone).await, Vec::new());
    assert!(
        !shrunk.dns_records.iter().any(|r| r.name.contains(&managed)),
        "{:#?}",
        shrunk.dns_records
    );
    // The removed domain is free for anyone again; the kept ones are not.
    assert_eq!(cp.store.get_domain_claim(&managed).await.unwrap(), None);
    assert!(cp.store.get_domain_claim(&www).await.unwrap().is_some());

    // A removed domain added again within the hour gets a certificate of its own (ACM
    // answers a RequestCertificate token it has seen with the certificate it made then,
    // deleted or not).
    let again = four
        .iter()
        .find(|d| !kept.contains(d) && **d != managed)
        .expect("a removed customer domain")
        .clone();
    let mut readded = kept.clone();
    readded.push(again.clone());
    let update = cp
        .instances
        .update_instance(update_domains(&tenant, &readded))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&update.name).await;
    let back = cp.instance(&tenant).await;
    assert_eq!(
        state_of(&back, &again),
        v1::custom_domain_status::State::Active
    );
    let arn = &back
        .custom_domain_statuses
        .iter()
        .find(|s| s.domain == again)
        .unwrap()
        .certificate_arn;
    assert!(!removed_arns.contains(arn), "{arn} was deleted");
    assert!(
        aws.certificates().await.iter().any(|(a, _)| a == arn),
        "{arn} is not in ACM"
    );
    assert!(aws.listener_certificates(&listener).await.contains(arn));

    // Deprovisioning leaves nothing: no certificate, none on the listener, no rule.
    let deletion = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deletion).await;
    assert_eq!(aws.certificates().await, Vec::new());
    assert_eq!(
        aws.listener_certificates(&listener).await,
        Vec::<String>::new()
    );
    assert_eq!(aws.rule_hosts(&listener).await, Vec::<Vec<String>>::new());
    assert_eq!(aws.managed_records(&zone).await, Vec::new());
    assert_eq!(cp.store.get_domain_claim(&www).await.unwrap(), None);
    // Every certificate came off the listener before its deletion was asked for.
    assert_eq!(gate.refused_deletes.load(Ordering::SeqCst), 0);
    platform::drop_tenant_databases(&[tenant]).await;
}

/// The customer has not created the record when the bound passes: the instance is ACTIVE
/// with the domain PENDING_VALIDATION (its host routed, no certificate on the listener yet);
/// UpdateInstance with the same domains later resumes, and the domain becomes ACTIVE.
#[tokio::test]
async fn a_domain_still_pending_at_the_bound_does_not_fail_the_instance() {
    let gate = Arc::new(Gate::default());
    let mut cp = start(gate.clone(), Some(0)).await;
    let aws = Aws::of(&cp).await;
    let tenant = platform::tenant("cdpend");
    let www = format!("www.{tenant}.example.net");
    let accepted = cp
        .instances
        .create_instance(create_with(&tenant, &[&www]))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&accepted.name).await;
    let pending = cp.instance(&tenant).await;
    assert_eq!(pending.state(), v1::InstanceState::Active);
    assert_eq!(
        state_of(&pending, &www),
        v1::custom_domain_status::State::PendingValidation
    );
    assert!(
        pending
            .dns_records
            .iter()
            .any(|r| r.purpose() == v1::dns_record::Purpose::CertificateValidation),
        "{:#?}",
        pending.dns_records
    );
    let listener = pending.load_balancer.as_ref().unwrap().listener_arn.clone();
    assert_eq!(
        aws.listener_certificates(&listener).await,
        Vec::<String>::new()
    );
    assert!(aws.rule_hosts(&listener).await.concat().contains(&www));
    assert!(gate.pending_reads.load(Ordering::SeqCst) > 0);

    // The record exists now; the same domains again resume.
    gate.open.store(true, Ordering::SeqCst);
    let resumed = cp
        .instances
        .update_instance(update_domains(&tenant, std::slice::from_ref(&www)))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&resumed.name).await;
    let active = cp.instance(&tenant).await;
    assert_eq!(
        state_of(&active, &www),
        v1::custom_domain_status::State::Active
    );
    let arn = active.custom_domain_statuses[0].certificate_arn.clone();
    assert_eq!(aws.listener_certificates(&listener).await, vec![arn]);
    // Nothing else to change now: the same domains again are INVALID_ARGUMENT.
    let refused = cp
        .instances
        .update_instance(update_domains(&tenant, std::slice::from_ref(&www)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let deletion = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deletion).await;
    assert_eq!(aws.certificates().await, Vec::new());
    assert_eq!(
        aws.listener_certificates(&listener).await,
        Vec::<String>::new()
    );
    platform::drop_tenant_databases(&[tenant]).await;
}

/// An update whose domains the instance's load balancer has no room for (a listener takes
/// one certificate here) fails at once with RESOURCE_EXHAUSTED (`LOAD_BALANCER_FULL`) and
/// changes nothing in AWS; one that fits then goes through.
#[tokio::test]
async fn a_domain_update_the_load_balancer_has_no_room_for_changes_nothing() {
    let gate = Arc::new(Gate::default());
    // ACM issues at once: this test is about room, not validation.
    gate.open.store(true, Ordering::SeqCst);
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    for lb in &mut config.environments[0].platform.load_balancers {
        lb.max_certificates = Some(1);
    }
    let mut cp = platform::start_with(
        config,
        EngineOptions::default(),
        |store| store,
        Some(gated(gate.clone())),
    )
    .await;
    let aws = Aws::of(&cp).await;
    let tenant = platform::tenant("cdom-room");
    let accepted = cp
        .instances
        .create_instance(create_with(&tenant, &[]))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&accepted.name).await;
    let active = cp.instance(&tenant).await;
    let placed = active.load_balancer.clone().expect("placed");
    let hosts = aws.rule_hosts(&placed.listener_arn).await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");

    // Two domains need two certificates on a listener that takes one.
    let two = vec![
        format!("www.{tenant}.example.org"),
        format!("shop.{tenant}.example.org"),
    ];
    let update = cp
        .instances
        .update_instance(update_domains(&tenant, &two))
        .await
        .unwrap()
        .into_inner();
    let (events, done) = cp.watch(&update.name).await;
    assert_eq!(
        platform::metadata(&done).status(),
        v1::OperationStatus::Failed,
        "{events:#?}"
    );
    let Some(instance_manager::proto::google_longrunning::operation::Result::Error(error)) =
        done.result.as_ref()
    else {
        panic!("no error on {done:?}");
    };
    assert_eq!(error.code, Code::ResourceExhausted as i32, "{error:?}");
    assert!(
        error.message.contains(&placed.name) && error.message.contains("certificate"),
        "{error:?}"
    );
    let info = error
        .details
        .iter()
        .find(|d| d.type_url.ends_with("google.rpc.ErrorInfo"))
        .map(|d| <tonic_types::pb::ErrorInfo as prost::Message>::decode(d.value.as_slice()))
        .expect("an ErrorInfo detail")
        .unwrap();
    assert_eq!(info.reason, "LOAD_BALANCER_FULL");

    // Nothing changed, read with the SDKs: no certificate in ACM or on the listener, the
    // rules route what they routed; the instance is serving with no custom domain.
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert!(after.custom_domains.is_empty(), "{after:?}");
    assert!(aws.certificates().await.is_empty());
    assert!(
        aws.listener_certificates(&placed.listener_arn)
            .await
            .is_empty()
    );
    assert_eq!(aws.rule_hosts(&placed.listener_arn).await, hosts);

    // One domain fits (and its claim, taken by the failed update, was given back).
    let one = vec![two[1].clone()];
    let update = cp
        .instances
        .update_instance(update_domains(&tenant, &one))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&update.name).await;
    let grown = cp.instance(&tenant).await;
    assert_eq!(grown.custom_domains, one);
    assert_eq!(aws.certificates().await.len(), 1);
    assert_eq!(
        aws.listener_certificates(&placed.listener_arn).await.len(),
        1
    );
    let deletion = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deletion).await;
    assert!(aws.certificates().await.is_empty());
}
