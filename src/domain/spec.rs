//! What a tenant asks for: the instance spec, its defaults and the rules that bound it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::violation::Violations;

/// The AWS environment (its own account and region) an instance lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Environment {
    Dev,
    Sit,
    Prod,
}

impl Environment {
    pub const ALL: [Environment; 3] = [Environment::Dev, Environment::Sit, Environment::Prod];

    /// Lower-case short form used inside resource names (`dev`, `sit`, `prod`).
    pub fn short(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Sit => "sit",
            Environment::Prod => "prod",
        }
    }

    /// Upper-case form used in tags, keys and configuration (`DEV`, `SIT`, `PROD`).
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "DEV",
            Environment::Sit => "SIT",
            Environment::Prod => "PROD",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(value))
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sizing tier: it only chooses the default CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Tier {
    Basic,
    #[default]
    Standard,
    Premium,
}

impl Tier {
    /// Default (CPU units, memory MiB) for the tier.
    pub fn default_size(self) -> (u32, u32) {
        match self {
            Tier::Basic => (256, 512),
            Tier::Standard => (512, 1024),
            Tier::Premium => (1024, 2048),
        }
    }
}

/// Bounds on the desired task count; configurable per deployment, 2–10 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleBounds {
    pub min: u32,
    pub max: u32,
}

impl Default for ScaleBounds {
    fn default() -> Self {
        Self { min: 2, max: 10 }
    }
}

pub const DEFAULT_WORDPRESS_IMAGE: &str = "wordpress";
pub const DEFAULT_WORDPRESS_VERSION: &str = "6.7-php8.3-apache";
/// Tags AWS allows on one resource.
pub const AWS_MAX_TAGS: usize = 50;
/// Tags the service puts on every resource itself (the unified tags and the instance id).
pub const OWN_TAGS: usize = 8;
/// Labels become tags on every resource, next to the service's own.
pub const MAX_LABELS: usize = AWS_MAX_TAGS - OWN_TAGS;
/// AWS tag limits, in characters.
pub const MAX_LABEL_KEY_CHARS: usize = 128;
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
/// Label keys may not use these prefixes (compared case-insensitively): `aws:` is AWS's,
/// `bbws:` the service's own tags (the default `tag_prefix`).
pub const RESERVED_LABEL_PREFIXES: [&str; 2] = ["aws:", "bbws:"];

/// A character AWS accepts in a tag key or value: `[\p{L}\p{Z}\p{N}_.:/=+\-@]`.
fn tag_char(c: char) -> bool {
    c.is_alphabetic()
        || c.is_numeric()
        || (c.is_whitespace() && !c.is_control())
        || "_.:/=+-@".contains(c)
}

/// A validated instance spec. Every field holds a value that the naming rules and the
/// cloud adapters can use as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub environment: Environment,
    pub organization_name: String,
    pub contact_email: String,
    pub tier: Tier,
    pub desired_count: u32,
    pub cpu: u32,
    pub memory_mib: u32,
    pub wordpress_image: String,
    pub wordpress_version: String,
    pub labels: BTreeMap<String, String>,
    pub opportunity_id: String,
    pub cost_center: String,
    /// The customer's own host names the site is also served at (validated, lower-case,
    /// unique), in the order given.
    #[serde(default)]
    pub custom_domains: Vec<String>,
}

/// Unvalidated input for a spec, as it arrives from a client. `None` environment means
/// the client did not give one; zero numbers and empty strings mean "use the default".
#[derive(Debug, Clone, Default)]
pub struct SpecInput {
    pub environment: Option<Environment>,
    pub organization_name: String,
    pub contact_email: String,
    pub tier: Option<Tier>,
    pub desired_count: i64,
    pub cpu: i64,
    pub memory_mib: i64,
    pub wordpress_image: String,
    pub wordpress_version: String,
    pub labels: BTreeMap<String, String>,
    pub opportunity_id: String,
    pub cost_center: String,
    pub custom_domains: Vec<String>,
}

/// What custom domains an environment accepts: not the platform's own domain or a name
/// under it, and at most `limit` per instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRules {
    /// The platform's `domain` (sites are `{tenant}.{domain}`); empty: none to keep out.
    pub platform_domain: String,
    /// Custom domains one instance may have.
    pub limit: u32,
}

impl Default for DomainRules {
    fn default() -> Self {
        Self {
            platform_domain: String::new(),
            limit: crate::cloud::DEFAULT_MAX_CUSTOM_DOMAINS,
        }
    }
}

/// The longest DNS name, in characters (without the trailing dot).
pub const MAX_DOMAIN_CHARS: usize = 253;
/// The longest DNS label.
pub const MAX_LABEL_CHARS: usize = 63;

/// A custom domain, already lower-cased: a DNS host name of at least two labels, each 1–63
/// of `[a-z0-9-]` not starting or ending with `-`, at most 253 characters, no wildcard, no
/// trailing dot, not an IP address.
pub fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("must be a host name such as www.example.com".into());
    }
    if domain.len() > MAX_DOMAIN_CHARS {
        return Err(format!("must be at most {MAX_DOMAIN_CHARS} characters"));
    }
    if domain.ends_with('.') {
        return Err("must not end with a dot".into());
    }
    if domain.contains('*') {
        return Err("must not be a wildcard: name each host".into());
    }
    if domain.parse::<std::net::IpAddr>().is_ok()
        || domain
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    {
        return Err("must be a host name, not an IP address".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err("must have at least two labels (e.g. example.com)".into());
    }
    for label in &labels {
        if label.is_empty() || label.len() > MAX_LABEL_CHARS {
            return Err(format!(
                "each label (between dots) must be 1-{MAX_LABEL_CHARS} characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("labels may contain only letters, digits and '-'".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with '-'".into());
        }
    }
    // Four all-numeric labels read as an IPv4 address to browsers (and ACM refuses them);
    // a numeric top-level label is no registrable name either.
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("must be a host name, not an IP address (its last label is numeric)".into());
    }
    Ok(())
}

/// Validates and normalises (lower-cases) `domains` against `rules`, reporting each bad one
/// as `custom_domains[i]`. Returns the normalised list, in the order given.
pub fn check_custom_domains(
    domains: &[String],
    rules: &DomainRules,
    violations: &mut Violations,
) -> Vec<String> {
    let limit = rules.limit as usize;
    if domains.len() > limit {
        violations.add(
            "custom_domains",
            format!(
                "at most {limit} custom domains per instance (got {})",
                domains.len()
            ),
        );
    }
    let platform = rules
        .platform_domain
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut normalised: Vec<String> = Vec::with_capacity(domains.len());
    for (index, raw) in domains.iter().enumerate() {
        let field = format!("custom_domains[{index}]");
        let domain = raw.trim().to_ascii_lowercase();
        if let Err(why) = check_domain(&domain) {
            violations.add(field, why);
        } else if !platform.is_empty()
            && (domain == platform || domain.ends_with(&format!(".{platform}")))
        {
            violations.add(
                field,
                format!("must not be the platform's own domain {platform} or a name under it"),
            );
        } else if let Some(first) = normalised.iter().position(|d| *d == domain) {
            violations.add(field, format!("repeats custom_domains[{first}] ({domain})"));
        }
        normalised.push(domain);
    }
    normalised
}

impl InstanceSpec {
    /// Validates `input`, applying defaults; every problem is reported with its field name.
    /// Custom domains follow the default [`DomainRules`] (no platform domain to keep out).
    pub fn parse(input: SpecInput, bounds: ScaleBounds) -> Result<Self, Violations> {
        Self::parse_with_domains(input, bounds, &DomainRules::default())
    }

    /// [`InstanceSpec::parse`] with the environment's rules for custom domains.
    pub fn parse_with_domains(
        input: SpecInput,
        bounds: ScaleBounds,
        domain_rules: &DomainRules,
    ) -> Result<Self, Violations> {
        let mut violations = Violations::new();
        if input.environment.is_none() {
            violations.add("environment", "is required (DEV, SIT or PROD)");
        }
        violations.check(
            "organization_name",
            check_organization_name(&input.organization_name),
        );
        violations.check("contact_email", check_email(&input.contact_email));
        let tier = input.tier.unwrap_or_default();
        let desired_count = if input.desired_count == 0 {
            bounds.min.max(2).min(bounds.max)
        } else {
            violations
                .check(
                    "desired_count",
                    check_desired_count(input.desired_count, bounds),
                )
                .unwrap_or(0)
        };
        let (default_cpu, default_memory) = tier.default_size();
        let cpu = if input.cpu == 0 {
            i64::from(default_cpu)
        } else {
            input.cpu
        };
        let memory = if input.memory_mib == 0 {
            i64::from(default_memory)
        } else {
            input.memory_mib
        };
        let size = violations.check("memory_mib", check_fargate_size(cpu, memory));
        let wordpress_image = if input.wordpress_image.is_empty() {
            DEFAULT_WORDPRESS_IMAGE.to_owned()
        } else {
            input.wordpress_image
        };
        violations.check("wordpress_image", check_image(&wordpress_image));
        let wordpress_version = if input.wordpress_version.is_empty() {
            DEFAULT_WORDPRESS_VERSION.to_owned()
        } else {
            input.wordpress_version
        };
        violations.check("wordpress_version", check_image_tag(&wordpress_version));
        check_labels(&input.labels, &mut violations);
        violations.check("opportunity_id", check_tag_value(&input.opportunity_id, 64));
        violations.check("cost_center", check_tag_value(&input.cost_center, 64));
        let custom_domains =
            check_custom_domains(&input.custom_domains, domain_rules, &mut violations);

        let (cpu, memory_mib) = size.unwrap_or((0, 0));
        violations.into_result(()).map(|()| InstanceSpec {
            environment: input.environment.unwrap_or(Environment::Dev),
            organization_name: input.organization_name,
            contact_email: input.contact_email,
            tier,
            desired_count,
            cpu,
            memory_mib,
            wordpress_image,
            wordpress_version,
            labels: input.labels,
            opportunity_id: input.opportunity_id,
            cost_center: input.cost_center,
            custom_domains,
        })
    }
}

fn check_organization_name(value: &str) -> Result<(), String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err("is required".into());
    }
    if value.chars().count() > 200 {
        return Err("must be at most 200 characters".into());
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// A deliberately conservative address check: ASCII, one `@`, a dot-atom local part and
/// a domain of at least two DNS labels.
pub fn check_email(value: &str) -> Result<(), String> {
    const INVALID: &str = "must be a valid e-mail address such as ops@example.com";
    if value.is_empty() {
        return Err("is required".into());
    }
    if !value.is_ascii() || value.len() > 254 {
        return Err(INVALID.into());
    }
    let Some((local, domain)) = value.split_once('@') else {
        return Err(INVALID.into());
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    if local_ok && domain_ok {
        Ok(())
    } else {
        Err(INVALID.into())
    }
}

pub fn check_desired_count(value: i64, bounds: ScaleBounds) -> Result<u32, String> {
    if value < i64::from(bounds.min) || value > i64::from(bounds.max) {
        return Err(format!(
            "must be between {} and {} (got {value})",
            bounds.min, bounds.max
        ));
    }
    u32::try_from(value).map_err(|_| "is out of range".to_string())
}

/// The CPU/memory pairs Fargate accepts (Linux), as documented by ECS.
pub fn fargate_memory_options(cpu: u32) -> Option<Vec<u32>> {
    let range = |from: u32, to: u32, step: u32| (from..=to).step_by(step as usize).collect();
    Some(match cpu {
        256 => vec![512, 1024, 2048],
        512 => range(1024, 4096, 1024),
        1024 => range(2048, 8192, 1024),
        2048 => range(4096, 16384, 1024),
        4096 => range(8192, 30720, 1024),
        8192 => range(16384, 61440, 4096),
        16384 => range(32768, 122_880, 8192),
        _ => return None,
    })
}

pub fn check_fargate_size(cpu: i64, memory_mib: i64) -> Result<(u32, u32), String> {
    let cpu_u = u32::try_from(cpu).ok();
    let Some(options) = cpu_u.and_then(fargate_memory_options) else {
        return Err(format!(
            "cpu {cpu} is not a Fargate size (256, 512, 1024, 2048, 4096, 8192 or 16384)"
        ));
    };
    match u32::try_from(memory_mib) {
        Ok(memory) if options.contains(&memory) => Ok((cpu_u.unwrap_or_default(), memory)),
        _ => Err(format!(
            "memory {memory_mib} MiB is not allowed with cpu {cpu} on Fargate (allowed: {})",
            options
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A container image repository such as `wordpress` or `123.dkr.ecr.eu-west-1.amazonaws.com/wp`,
/// without a tag or digest (see [`super::image::check_repository`]).
pub fn check_image(value: &str) -> Result<(), String> {
    super::image::check_repository(value)
}

/// A container image tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn check_image_tag(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err("must be an image tag of at most 128 letters, digits, '_', '.' and '-'".into())
    }
}

/// Free text that ends up in an AWS tag value: optional, bounded, tag-safe characters only.
pub fn check_tag_value(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.:/=+-@ ".contains(c))
    {
        return Err("must contain only letters, digits, spaces and _ . : / = + - @".into());
    }
    Ok(())
}

/// Labels are applied as AWS tags, so they follow AWS's tag rules.
pub(crate) fn check_labels(labels: &BTreeMap<String, String>, violations: &mut Violations) {
    if labels.len() > MAX_LABELS {
        violations.add(
            "labels",
            format!(
                "must have at most {MAX_LABELS} entries: AWS allows {AWS_MAX_TAGS} tags per resource and {OWN_TAGS} are the service's own"
            ),
        );
    }
    for (key, value) in labels {
        let field = format!("labels[{key:?}]");
        let key_chars = key.chars().count();
        if key_chars == 0 || key_chars > MAX_LABEL_KEY_CHARS || !key.chars().all(tag_char) {
            violations.add(
                field.clone(),
                format!(
                    "label keys must be 1-{MAX_LABEL_KEY_CHARS} letters, digits, spaces or _ . : / = + - @"
                ),
            );
        } else if RESERVED_LABEL_PREFIXES
            .iter()
            .any(|prefix| key.to_lowercase().starts_with(prefix))
        {
            violations.add(
                field.clone(),
                "label keys must not start with aws: or bbws: (reserved for AWS and the service's own tags)",
            );
        }
        if value.chars().count() > MAX_LABEL_VALUE_CHARS || !value.chars().all(tag_char) {
            violations.add(
                field,
                format!(
                    "label values must be at most {MAX_LABEL_VALUE_CHARS} letters, digits, spaces or _ . : / = + - @"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_input() -> SpecInput {
        SpecInput {
            environment: Some(Environment::Dev),
            organization_name: "Acme Corp".into(),
            contact_email: "ops@acme.example".into(),
            ..SpecInput::default()
        }
    }

    fn fields(result: Result<InstanceSpec, Violations>) -> Vec<String> {
        result
            .expect_err("should be invalid")
            .iter()
            .map(|v| v.field.clone())
            .collect()
    }

    #[test]
    fn defaults_are_applied() {
        let spec = InstanceSpec::parse(valid_input(), ScaleBounds::default()).unwrap();
        assert_eq!(spec.desired_count, 2);
        assert_eq!((spec.cpu, spec.memory_mib), (512, 1024));
        assert_eq!(spec.tier, Tier::Standard);
        assert_eq!(spec.wordpress_image, DEFAULT_WORDPRESS_IMAGE);
        let premium = InstanceSpec::parse(
            SpecInput {
                tier: Some(Tier::Premium),
                ..valid_input()
            },
            ScaleBounds::default(),
        )
        .unwrap();
        assert_eq!((premium.cpu, premium.memory_mib), (1024, 2048));
    }

    #[test]
    fn missing_environment_and_bad_email_are_both_reported() {
        let input = SpecInput {
            environment: None,
            contact_email: "not-an-email".into(),
            ..valid_input()
        };
        assert_eq!(
            fields(InstanceSpec::parse(input, ScaleBounds::default())),
            vec!["environment", "contact_email"]
        );
    }

    #[test]
    fn desired_count_respects_configured_bounds() {
        for (count, ok) in [(1, false), (2, true), (10, true), (11, false), (-1, false)] {
            let input = SpecInput {
                desired_count: count,
                ..valid_input()
            };
            assert_eq!(
                InstanceSpec::parse(input, ScaleBounds::default()).is_ok(),
                ok,
                "count {count}"
            );
        }
        let wide = ScaleBounds { min: 1, max: 50 };
        let input = SpecInput {
            desired_count: 40,
            ..valid_input()
        };
        assert_eq!(InstanceSpec::parse(input, wide).unwrap().desired_count, 40);
    }

    #[test]
    fn fargate_pairs() {
        assert!(check_fargate_size(256, 512).is_ok());
        assert!(check_fargate_size(512, 4096).is_ok());
        assert!(check_fargate_size(16384, 122_880).is_ok());
        assert!(check_fargate_size(256, 4096).is_err());
        assert!(check_fargate_size(512, 1536).is_err());
        assert!(check_fargate_size(300, 1024).is_err());
        assert!(check_fargate_size(-512, 1024).is_err());
        assert!(check_fargate_size(512, -1024).is_err());
        let input = SpecInput {
            cpu: 256,
            memory_mib: 8192,
            ..valid_input()
        };
        assert_eq!(
            fields(InstanceSpec::parse(input, ScaleBounds::default())),
            vec!["memory_mib"]
        );
    }

    #[test]
    fn emails() {
        for ok in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "x_y@example-1.com",
        ] {
            assert!(check_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@b..com",
            ".a@b.com",
            "a@-b.com",
            "ü@b.com",
            "a@b.c0",
        ] {
            assert!(check_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels_images_and_tags() {
        let mut labels = BTreeMap::new();
        labels.insert("team".to_string(), "web".to_string());
        labels.insert("Bad;Key".to_string(), "x".to_string());
        labels.insert(
            "plan".to_string(),
            "Gold Plan: Ünïcode +1 @ 2/3".to_string(),
        );
        labels.insert("note".to_string(), "a\nb".to_string());
        let input = SpecInput {
            labels,
            wordpress_image: "Wordpress;rm".into(),
            wordpress_version: "-bad".into(),
            opportunity_id: "opp;1".into(),
            ..valid_input()
        };
        let got = fields(InstanceSpec::parse(input, ScaleBounds::default()));
        assert_eq!(
            got,
            vec![
                "wordpress_image",
                "wordpress_version",
                "labels[\"Bad;Key\"]",
                "labels[\"note\"]",
                "opportunity_id"
            ]
        );
        assert!(check_image("123456789012.dkr.ecr.eu-west-1.amazonaws.com/wp").is_ok());
    }

    #[test]
    fn labels_follow_aws_tag_rules() {
        let check = |pairs: &[(&str, &str)]| {
            let labels = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match InstanceSpec::parse(
                SpecInput {
                    labels,
                    ..valid_input()
                },
                ScaleBounds::default(),
            ) {
                Ok(_) => Vec::new(),
                Err(violations) => violations.iter().map(|v| v.field.clone()).collect(),
            }
        };
        let k128 = "k".repeat(128);
        let v256 = "é".repeat(256);
        assert!(check(&[(k128.as_str(), v256.as_str()), ("Team Name", "")]).is_empty());
        let k129 = "k".repeat(129);
        let v257 = "v".repeat(257);
        assert_eq!(
            check(&[(k129.as_str(), "v")]),
            vec![format!("labels[{k129:?}]")]
        );
        assert_eq!(check(&[("k", v257.as_str())]), vec!["labels[\"k\"]"]);
        assert_eq!(check(&[("", "v")]), vec!["labels[\"\"]"]);
        for reserved in ["aws:x", "AWS:x", "bbws:tenant-id", "Bbws:x"] {
            assert_eq!(
                check(&[(reserved, "v")]),
                vec![format!("labels[{reserved:?}]")]
            );
        }
        let many: Vec<(String, String)> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(check(&many), vec!["labels"]);
        assert!(check(&many[..MAX_LABELS]).is_empty());
        assert_eq!(MAX_LABELS + OWN_TAGS, AWS_MAX_TAGS);
    }

    #[test]
    fn organisation_names() {
        for (name, ok) in [
            ("Acme", true),
            ("Ünïcode GmbH", true),
            ("", false),
            ("   ", false),
            ("a\nb", false),
        ] {
            let input = SpecInput {
                organization_name: name.into(),
                ..valid_input()
            };
            assert_eq!(
                InstanceSpec::parse(input, ScaleBounds::default()).is_ok(),
                ok,
                "{name:?}"
            );
        }
        let long = SpecInput {
            organization_name: "x".repeat(201),
            ..valid_input()
        };
        assert!(InstanceSpec::parse(long, ScaleBounds::default()).is_err());
    }

    #[test]
    fn custom_domains_are_host_names() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let name_253 = format!("{0}.{0}.{0}.{1}.com", long_label, "b".repeat(57));
        assert_eq!(name_253.len(), 253);
        let name_254 = format!("a{name_253}");
        for (domain, ok) in [
            ("www.example.com", true),
            ("example.com", true),
            ("xn--bcher-kva.example", true),
            ("a-b.c1.example.org", true),
            (name_253.as_str(), true),
            (name_254.as_str(), false),
            (&format!("{long_label}.com"), true),
            (&format!("{too_long_label}.com"), false),
            ("localhost", false),
            ("", false),
            ("www.example.com.", false),
            ("*.example.com", false),
            ("-www.example.com", false),
            ("www-.example.com", false),
            ("www..example.com", false),
            (".example.com", false),
            ("www.exa_mple.com", false),
            ("www.exämple.com", false),
            ("www example.com", false),
            ("192.168.1.10", false),
            ("::1", false),
            ("[2001:db8::1]", false),
            ("10.0.0.com", true),
        ] {
            assert_eq!(check_domain(domain).is_ok(), ok, "{domain:?}");
        }
    }

    #[test]
    fn custom_domains_are_normalised_unique_bounded_and_not_the_platform_s() {
        let rules = DomainRules {
            platform_domain: "sites.example.net".into(),
            limit: 3,
        };
        let parse = |domains: &[&str]| {
            InstanceSpec::parse_with_domains(
                SpecInput {
                    custom_domains: domains.iter().map(|d| d.to_string()).collect(),
                    ..valid_input()
                },
                ScaleBounds::default(),
                &rules,
            )
        };
        let spec = parse(&["WWW.Example.COM", "shop.example.com"]).unwrap();
        assert_eq!(
            spec.custom_domains,
            vec!["www.example.com", "shop.example.com"]
        );
        assert_eq!(
            fields(parse(&[
                "www.example.com",
                "bad_name.com",
                "WWW.EXAMPLE.COM"
            ])),
            vec!["custom_domains[1]", "custom_domains[2]"]
        );
        assert_eq!(
            fields(parse(&[
                "a.example.com",
                "b.example.com",
                "c.example.com",
                "d.example.com"
            ])),
            vec!["custom_domains"]
        );
        assert_eq!(
            fields(parse(&[
                "ok.example.com",
                "sites.example.net",
                "acme.sites.example.net"
            ])),
            vec!["custom_domains[1]", "custom_domains[2]"]
        );
        // A name that merely ends with the same letters is not under the platform's domain.
        assert!(parse(&["mysites.example.net"]).is_ok());
        // The default rules: five, no platform domain.
        let six: Vec<String> = (0..6).map(|i| format!("d{i}.example.com")).collect();
        let input = SpecInput {
            custom_domains: six,
            ..valid_input()
        };
        assert_eq!(
            fields(InstanceSpec::parse(input, ScaleBounds::default())),
            vec!["custom_domains"]
        );
    }
}
