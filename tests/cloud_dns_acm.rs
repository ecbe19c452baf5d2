//! The issue-14 adapters against moto — Route53 (`Route53Dns`), ACM (`AcmCertificates`),
//! the listener's SNI certificates and multi-host rules (`AwsRouting`) — and the emulated
//! platform's hosted zones. Everything is checked with the AWS SDKs directly, never with the
//! adapters' own reads. Every test works in an account of its own.
//!
//! What moto 5.2 does here, and what it does not (so what these tests cannot show; the
//! adapters are written from AWS's documentation, and their error classification is
//! unit-tested in `src/cloud/aws/{route53,acm,elb}.rs`):
//! - Route53: ChangeResourceRecordSets and GetChange always answer `INSYNC` (never
//!   `PENDING`), so a caller's wait for INSYNC ends at once; every change has the same id
//!   (`/change/C2682N5HXP0BZ4`) and GetChange answers INSYNC for any id. Alias records are
//!   stored and listed back (AliasTarget with the zone id, DNS name and
//!   EvaluateTargetHealth as sent, no TTL). UPSERT replaces. Names come back with the
//!   trailing dot, and a wildcard as `*` (AWS answers `\052`). An unknown zone is
//!   `NoSuchHostedZone`. `PriorRequestNotComplete`, throttling and a DELETE racing another
//!   change never happen.
//! - ACM: RequestCertificate answers PENDING_VALIDATION, with the DNS validation record in
//!   DescribeCertificate at once (AWS leaves it out for several seconds); the certificate
//!   turns ISSUED on the first read 60 s after the request (`MOTO_ACM_VALIDATION_WAIT`),
//!   whether or not the record exists. The idempotency token is honoured for an hour (when
//!   the tags are the same). DeleteCertificate never answers `ResourceInUseException`:
//!   moto's ELBv2 does not record which listener uses a certificate.
//! - ELBv2: AddListenerCertificates appends without checking for duplicates (AWS's is
//!   idempotent; the adapter reads first); DescribeListenerCertificates marks the listener's
//!   first certificate `IsDefault`. ModifyRule replaces the conditions; quotas
//!   (`TooManyRules`, five condition values per rule) are not enforced.

mod common;

use aws_config::SdkConfig;
use aws_sdk_route53::types::RrType;
use instance_manager::cloud::aws::{AcmCertificates, AwsRouting, Route53Dns};
use instance_manager::cloud::platform::{EMULATED_MANAGED_ZONE, ensure_platform};
use instance_manager::cloud::{
    CertificateSpec, Certificates, DbTls, Dns, DnsRecordSet, ErrorKind, HostRuleSpec,
    MasterCredentials, Platform, Routing, Tags, TargetGroupSpec,
};
use instance_manager::config::Secret;
use instance_manager::domain::Environment;

/// SdkConfig for a fresh, empty AWS account in the shared moto.
async fn fresh_account() -> SdkConfig {
    common::fresh_account("cloud-dns-acm-tests").await
}

fn mariadb() -> MasterCredentials {
    let opts = mysql_async::Opts::from_url(&common::mysql_url()).unwrap();
    MasterCredentials {
        host: opts.ip_or_hostname().to_owned(),
        port: opts.tcp_port(),
        username: opts.user().unwrap_or("root").to_owned(),
        password: Secret::new(opts.pass().unwrap_or_default()),
        tls: DbTls::Disabled,
        ca_file: None,
    }
}

/// A fresh account with the emulated SIT platform.
async fn platform(domain: &str) -> (SdkConfig, Platform) {
    let sdk = fresh_account().await;
    let platform = ensure_platform(&sdk, Environment::Sit, &mariadb(), domain)
        .await
        .expect("bootstrap platform");
    (sdk, platform)
}

/// The DNS name and canonical hosted zone id of the listener's ALB, from the ELBv2 SDK.
async fn load_balancer_of(sdk: &SdkConfig, listener_arn: &str) -> (String, String) {
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(sdk);
    let listeners = elb
        .describe_listeners()
        .listener_arns(listener_arn)
        .send()
        .await
        .unwrap();
    let lb_arn = listeners.listeners()[0].load_balancer_arn().unwrap();
    let lbs = elb
        .describe_load_balancers()
        .load_balancer_arns(lb_arn)
        .send()
        .await
        .unwrap();
    let lb = &lbs.load_balancers()[0];
    (
        lb.dns_name().unwrap().to_owned(),
        lb.canonical_hosted_zone_id().unwrap().to_owned(),
    )
}

/// Every record set of the zone named `name` (any type), from the Route53 SDK.
async fn record_sets(
    sdk: &SdkConfig,
    zone_id: &str,
    name: &str,
) -> Vec<aws_sdk_route53::types::ResourceRecordSet> {
    let route53 = aws_sdk_route53::Client::new(sdk);
    let mut all = Vec::new();
    let mut start: Option<(String, RrType)> = None;
    loop {
        let page = route53
            .list_resource_record_sets()
            .hosted_zone_id(zone_id)
            .set_start_record_name(start.as_ref().map(|(n, _)| n.clone()))
            .set_start_record_type(start.as_ref().map(|(_, t)| t.clone()))
            .send()
            .await
            .unwrap();
        all.extend(page.resource_record_sets().iter().cloned());
        if !page.is_truncated() {
            break;
        }
        start = Some((
            page.next_record_name().unwrap().to_owned(),
            page.next_record_type().unwrap().clone(),
        ));
    }
    let want = format!("{}.", name.trim_end_matches('.'));
    all.into_iter()
        .filter(|set| set.name().eq_ignore_ascii_case(&want) || set.name() == name)
        .collect()
}

fn owner(tenant: &str, instance: &str) -> Tags {
    vec![
        ("bbws:tenant-id".into(), tenant.into()),
        ("bbws:instance-id".into(), instance.into()),
        ("bbws:environment".into(), "SIT".into()),
        ("bbws:managed-by".into(), "instance-manager".into()),
        ("bbws:component".into(), "certificate".into()),
    ]
}

fn unique_domain() -> String {
    format!(
        "t{}.sites.test",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

#[tokio::test]
async fn the_platform_has_its_zone_and_a_managed_customer_zone_once() {
    let domain = unique_domain();
    let (sdk, first) = platform(&domain).await;
    let second = ensure_platform(&sdk, Environment::Sit, &mariadb(), &domain)
        .await
        .unwrap();
    assert_eq!(first.hosted_zone_id, second.hosted_zone_id);
    assert_eq!(first.managed_zones, second.managed_zones);
    assert!(!first.hosted_zone_id.is_empty());
    assert!(
        !first.hosted_zone_id.starts_with('/'),
        "{}",
        first.hosted_zone_id
    );
    assert_eq!(first.managed_zones.len(), 1);
    assert_eq!(first.managed_zones[0].domain, EMULATED_MANAGED_ZONE);
    assert_ne!(first.managed_zones[0].hosted_zone_id, first.hosted_zone_id);
    assert_eq!(
        first
            .managed_zone_of(&format!("shop.{EMULATED_MANAGED_ZONE}"))
            .map(|z| z.hosted_zone_id.as_str()),
        Some(first.managed_zones[0].hosted_zone_id.as_str())
    );

    // Exactly two public zones in the account, named as the platform says.
    let zones = aws_sdk_route53::Client::new(&sdk)
        .list_hosted_zones()
        .send()
        .await
        .unwrap();
    let mut seen: Vec<(String, String, bool)> = zones
        .hosted_zones()
        .iter()
        .map(|zone| {
            (
                zone.name().trim_end_matches('.').to_owned(),
                zone.id().trim_start_matches("/hostedzone/").to_owned(),
                zone.config().is_some_and(|c| c.private_zone()),
            )
        })
        .collect();
    seen.sort();
    let mut want = vec![
        (domain.clone(), first.hosted_zone_id.clone(), false),
        (
            EMULATED_MANAGED_ZONE.to_owned(),
            first.managed_zones[0].hosted_zone_id.clone(),
            false,
        ),
    ];
    want.sort();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn alias_records_point_at_the_load_balancer_and_go_away() {
    let domain = unique_domain();
    let (sdk, platform) = platform(&domain).await;
    let zone = &platform.hosted_zone_id;
    let (alb_dns, alb_zone) = load_balancer_of(&sdk, &platform.listener_arn).await;
    let dns = Route53Dns::new(&sdk);
    let name = format!("acme.{domain}");

    let change = dns
        .upsert_alias(zone, &name, &alb_dns, &alb_zone)
        .await
        .unwrap();
    assert!(!change.is_empty() && !change.starts_with('/'), "{change}");
    // moto: INSYNC at once. Both forms of the id are accepted.
    assert!(dns.change_in_sync(&change).await.unwrap());
    assert!(
        dns.change_in_sync(&format!("/change/{change}"))
            .await
            .unwrap()
    );
    // Twice is still one record.
    dns.upsert_alias(zone, &name, &alb_dns, &alb_zone)
        .await
        .unwrap();

    let sets = record_sets(&sdk, zone, &name).await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = &sets[0];
    assert_eq!(set.r#type(), &RrType::A);
    assert_eq!(set.ttl(), None, "an alias record has no TTL");
    assert!(set.resource_records().is_empty());
    let alias = set.alias_target().expect("an alias record");
    assert_eq!(
        alias.dns_name().trim_end_matches('.').to_ascii_lowercase(),
        alb_dns.to_ascii_lowercase()
    );
    assert_eq!(alias.hosted_zone_id(), alb_zone);
    assert!(!alias.evaluate_target_health());

    // The adapter's read agrees, in any spelling of the name.
    let expected = DnsRecordSet {
        name: name.clone(),
        record_type: "A".into(),
        value: alb_dns.to_ascii_lowercase(),
        alias_zone_id: Some(alb_zone.clone()),
    };
    assert_eq!(
        dns.record(zone, &format!("ACME.{domain}."), "A")
            .await
            .unwrap(),
        Some(expected)
    );
    // A wildcard is found in either spelling (AWS lists it as `\052`).
    dns.upsert_alias(zone, &format!("*.wild.{domain}"), &alb_dns, &alb_zone)
        .await
        .unwrap();
    for spelling in [format!("*.wild.{domain}"), format!("\\052.wild.{domain}.")] {
        let found = dns.record(zone, &spelling, "A").await.unwrap().unwrap();
        assert_eq!(found.name, format!("*.wild.{domain}"));
    }
    // Another tenant's name is not this record.
    assert_eq!(
        dns.record(zone, &format!("acm.{domain}"), "A")
            .await
            .unwrap(),
        None
    );

    let deleted = dns.delete_record(zone, &name, "A").await.unwrap();
    assert!(deleted.is_some());
    assert!(record_sets(&sdk, zone, &name).await.is_empty());
    assert_eq!(dns.delete_record(zone, &name, "A").await.unwrap(), None);
    assert_eq!(dns.record(zone, &name, "A").await.unwrap(), None);

    // A zone that does not exist.
    let missing = dns.record("Z0NOSUCHZONE00", &name, "A").await.unwrap_err();
    assert_eq!(missing.kind, ErrorKind::NotFound, "{missing}");
}

#[tokio::test]
async fn validation_records_go_into_a_managed_zone() {
    let (sdk, platform) = platform(&unique_domain()).await;
    let zone = &platform.managed_zones[0].hosted_zone_id;
    let dns = Route53Dns::new(&sdk);
    let name = format!("_d930b28be6c5927595552b219965053e.shop.{EMULATED_MANAGED_ZONE}");
    let value = "_c9edd76ee4a0e2a74388032f3861cc50.ykybfrwcxw.acm-validations.aws";
    dns.upsert_record(zone, &name, "CNAME", value)
        .await
        .unwrap();
    dns.upsert_record(zone, &name, "CNAME", value)
        .await
        .unwrap();

    let sets = record_sets(&sdk, zone, &name).await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0].r#type(), &RrType::Cname);
    assert_eq!(sets[0].ttl(), Some(300));
    let values: Vec<&str> = sets[0]
        .resource_records()
        .iter()
        .map(|r| r.value().trim_end_matches('.'))
        .collect();
    assert_eq!(values, [value]);

    assert!(
        dns.delete_record(zone, &name, "CNAME")
            .await
            .unwrap()
            .is_some()
    );
    assert!(record_sets(&sdk, zone, &name).await.is_empty());
}

#[tokio::test]
async fn a_certificate_is_requested_with_dns_validation_and_adopted_by_its_owner() {
    let sdk = fresh_account().await;
    let acm_sdk = aws_sdk_acm::Client::new(&sdk);
    let certificates = AcmCertificates::new(&sdk);
    let domain = format!("shop.{EMULATED_MANAGED_ZONE}");
    let spec = CertificateSpec {
        domain: domain.clone(),
        idempotency_token: "acme_wp_shop".into(),
        tags: owner("acme", "wp"),
    };

    let arn = certificates.ensure_certificate(&spec).await.unwrap();
    let described = acm_sdk
        .describe_certificate()
        .certificate_arn(&arn)
        .send()
        .await
        .unwrap();
    let detail = described.certificate().unwrap();
    assert_eq!(detail.domain_name(), Some(domain.as_str()));
    let options = detail.domain_validation_options();
    assert_eq!(options.len(), 1);
    assert_eq!(
        options[0].validation_method(),
        Some(&aws_sdk_acm::types::ValidationMethod::Dns)
    );
    let tags = acm_sdk
        .list_tags_for_certificate()
        .certificate_arn(&arn)
        .send()
        .await
        .unwrap();
    let mut have: Tags = tags
        .tags()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().unwrap_or_default().to_owned()))
        .collect();
    have.sort();
    let mut want = spec.tags.clone();
    want.sort();
    assert_eq!(have, want);

    // What the adapter reports: moto answers PENDING_VALIDATION with the record at once.
    let status = certificates.certificate(&arn).await.unwrap().unwrap();
    assert_eq!(status.arn, arn);
    assert_eq!(status.domain, domain);
    assert_eq!(status.status, "PENDING_VALIDATION");
    let record = status.validation.expect("moto has the record at once");
    assert_eq!(record.record_type, "CNAME");
    assert!(record.name.ends_with(&format!(".{domain}")), "{record:?}");
    assert!(!record.name.ends_with('.') && !record.value.ends_with('.'));
    let sdk_record = options[0].resource_record().unwrap();
    assert_eq!(sdk_record.name().trim_end_matches('.'), record.name);
    assert_eq!(sdk_record.value().trim_end_matches('.'), record.value);

    // Adopted by its owner; another instance of the same domain gets its own.
    assert_eq!(certificates.ensure_certificate(&spec).await.unwrap(), arn);
    let other = CertificateSpec {
        domain: domain.clone(),
        idempotency_token: "acme_wp2_shop".into(),
        tags: owner("acme", "wp2"),
    };
    let other_arn = certificates.ensure_certificate(&other).await.unwrap();
    assert_ne!(other_arn, arn);
    let listed = acm_sdk.list_certificates().send().await.unwrap();
    let mut arns: Vec<&str> = listed
        .certificate_summary_list()
        .iter()
        .filter(|s| s.domain_name() == Some(domain.as_str()))
        .filter_map(|s| s.certificate_arn())
        .collect();
    arns.sort();
    let mut want = vec![arn.as_str(), other_arn.as_str()];
    want.sort();
    assert_eq!(arns, want);

    // Listed by tags with all of them.
    let found = certificates
        .tagged_certificates(&vec![("bbws:instance-id".into(), "wp".into())])
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, arn);
    assert_eq!(found[0].kind, "certificate");
    assert_eq!(found[0].tag("tenant-id"), Some("acme"));

    // A bad token is refused before the call.
    let bad = CertificateSpec {
        idempotency_token: "shop.example".into(),
        ..spec.clone()
    };
    assert_eq!(
        certificates
            .ensure_certificate(&bad)
            .await
            .unwrap_err()
            .kind,
        ErrorKind::Fatal
    );

    certificates.delete_certificate(&arn).await.unwrap();
    let gone = acm_sdk
        .describe_certificate()
        .certificate_arn(&arn)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_acm::error::ProvideErrorMetadata::code(&gone),
        Some("ResourceNotFoundException")
    );
    certificates.delete_certificate(&arn).await.unwrap();
    assert_eq!(certificates.certificate(&arn).await.unwrap(), None);
    certificates.delete_certificate(&other_arn).await.unwrap();
}

#[tokio::test]
async fn certificates_on_the_listener_and_hosts_on_the_rule() {
    let (sdk, platform) = platform(&unique_domain()).await;
    let listener = &platform.listener_arn;
    let routing = AwsRouting::new(&sdk);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let certificates = AcmCertificates::new(&sdk);
    let cert = certificates
        .ensure_certificate(&CertificateSpec {
            domain: format!("shop.{EMULATED_MANAGED_ZONE}"),
            idempotency_token: "acme_wp_listener".into(),
            tags: owner("acme", "wp"),
        })
        .await
        .unwrap();

    let on_listener = || async {
        elb.describe_listener_certificates()
            .listener_arn(listener)
            .send()
            .await
            .unwrap()
            .certificates()
            .iter()
            .map(|c| {
                (
                    c.certificate_arn().unwrap().to_owned(),
                    c.is_default().unwrap_or(false),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = on_listener().await;
    assert_eq!(
        before.iter().filter(|(_, default)| *default).count(),
        1,
        "{before:?}"
    );
    assert_eq!(
        routing.listener_certificates(listener).await.unwrap(),
        Vec::<String>::new()
    );

    routing
        .add_listener_certificate(listener, &cert)
        .await
        .unwrap();
    routing
        .add_listener_certificate(listener, &cert)
        .await
        .unwrap();
    let after = on_listener().await;
    assert_eq!(
        after
            .iter()
            .filter(|(arn, _)| *arn == cert)
            .collect::<Vec<_>>(),
        [&(cert.clone(), false)],
        "once, not as the default: {after:?}"
    );
    assert_eq!(
        routing.listener_certificates(listener).await.unwrap(),
        vec![cert.clone()]
    );

    routing
        .remove_listener_certificate(listener, &cert)
        .await
        .unwrap();
    assert_eq!(on_listener().await, before);
    routing
        .remove_listener_certificate(listener, &cert)
        .await
        .unwrap();
    assert!(
        routing
            .listener_certificates(listener)
            .await
            .unwrap()
            .is_empty()
    );

    // One rule, three hosts.
    let tg = routing
        .ensure_target_group(&TargetGroupSpec {
            name: format!(
                "bbws-sit-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            vpc_id: platform.vpc_id.clone(),
            health_check_path: "/".into(),
            matcher: "200".into(),
            deregistration_delay_secs: None,
            tags: owner("acme", "wp"),
        })
        .await
        .unwrap();
    let spec = HostRuleSpec {
        listener_arn: listener.clone(),
        hosts: vec![format!("acme.{}", platform.domain)],
        target_group_arn: tg.clone(),
        priority: 10,
        tags: owner("acme", "wp"),
    };
    let rule = routing.ensure_host_rule(&spec).await.unwrap();
    let hosts = vec![
        format!("acme.{}", platform.domain),
        format!("shop.{EMULATED_MANAGED_ZONE}"),
        "www.acme-shop.example".to_owned(),
    ];
    routing.set_rule_hosts(&rule, &hosts).await.unwrap();

    let described = elb.describe_rules().rule_arns(&rule).send().await.unwrap();
    let sdk_rule = &described.rules()[0];
    assert_eq!(sdk_rule.conditions().len(), 1);
    let condition = &sdk_rule.conditions()[0];
    assert_eq!(condition.field(), Some("host-header"));
    let values = match condition.host_header_config() {
        Some(config) if !config.values().is_empty() => config.values().to_vec(),
        _ => condition.values().to_vec(),
    };
    assert_eq!(values, hosts);
    assert_eq!(sdk_rule.priority(), Some("10"));
    // Its action stays.
    assert_eq!(sdk_rule.actions()[0].target_group_arn(), Some(tg.as_str()));
    assert_eq!(
        routing.rule_hosts(&rule).await.unwrap(),
        Some(hosts.clone())
    );

    // Adopted by its first host and owner; refused to another instance.
    assert_eq!(routing.ensure_host_rule(&spec).await.unwrap(), rule);
    let theirs = HostRuleSpec {
        tags: owner("acme", "wp2"),
        priority: 11,
        ..spec.clone()
    };
    assert_eq!(
        routing.ensure_host_rule(&theirs).await.unwrap_err().kind,
        ErrorKind::Fatal
    );
    // Four hosts do not fit one rule; nothing is changed.
    let four: Vec<String> = (0..4).map(|i| format!("h{i}.example")).collect();
    assert_eq!(
        routing.set_rule_hosts(&rule, &four).await.unwrap_err().kind,
        ErrorKind::Fatal
    );
    assert_eq!(routing.rule_hosts(&rule).await.unwrap(), Some(hosts));

    routing.delete_rule(&rule).await.unwrap();
    assert_eq!(routing.rule_hosts(&rule).await.unwrap(), None);
    assert_eq!(
        routing
            .set_rule_hosts(&rule, &four[..1])
            .await
            .unwrap_err()
            .kind,
        ErrorKind::NotFound
    );
    routing.delete_target_group(&tg).await.unwrap();
    certificates.delete_certificate(&cert).await.unwrap();
}
