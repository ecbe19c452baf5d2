//! Every AWS and MySQL name, derived from a (validated) tenant id and environment alone, so
//! a workflow that restarts on another replica finds the same resources again.
//!
//! Names do not include the instance id: a tenant has one live instance per environment
//! (its site's host name, service and database names stay readable and stable), but a
//! failed instance and its successor meet the same names. So names never decide
//! ownership: every resource carries the `instance-id` tag (and MySQL databases a row in
//! the server's ownership table), and nothing found by name is adopted or removed unless
//! it carries this instance's owner tags.
//!
//! A name that fits its service's limit is used as is. One that does not is cut and given a
//! hash of the full name: `{prefix}{sep}{10 hex}`, exactly `limit` characters long. Natural
//! names are only used when they are *shorter* than the limit, so a cut name (always exactly
//! the limit) can never equal a natural one, and two cut names collide only if their
//! natural names share the prefix *and* a 40-bit hash.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::ids::TenantId;
use super::spec::Environment;

const HASH_LEN: usize = 10;
/// How much of an operation id names the operation's databases.
const OPERATION_SHORT: usize = 8;

/// Limits, from each service's documentation.
pub mod limits {
    pub const TARGET_GROUP_NAME: usize = 32;
    pub const MYSQL_DATABASE: usize = 64;
    /// MySQL 5.7+ (and RDS MySQL) user names; MariaDB allows 80.
    pub const MYSQL_USER: usize = 32;
    pub const ECS_NAME: usize = 255;
    pub const EFS_CREATION_TOKEN: usize = 64;
    pub const SECRET_NAME: usize = 512;
    pub const COGNITO_POOL_NAME: usize = 128;
    pub const COGNITO_DOMAIN: usize = 63;
    pub const IAM_ROLE_NAME: usize = 64;
}

/// The IAM path of every instance's task role: the platform's file-system policy grants
/// mounts to the roles under it (`arn:aws:iam::ACCOUNT:role/bbws/instances/*`), and the
/// reconciler lists them by it.
pub const TASK_ROLE_PATH: &str = "/bbws/instances/";

fn short_hash(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    hex::encode(digest)[..HASH_LEN].to_owned()
}

/// `natural` if it is shorter than `limit`, else its prefix, `sep` and a hash of it, exactly
/// `limit` long. Inputs are ASCII (validated ids), so byte slicing is safe.
pub fn fit(natural: &str, limit: usize, sep: char) -> String {
    if natural.len() < limit {
        return natural.to_owned();
    }
    let keep = limit - HASH_LEN - 1;
    format!("{}{sep}{}", &natural[..keep], short_hash(natural))
}

/// The names of one tenant's resources in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceNames {
    /// `bbws-{env}-{tenant}`: ECS service and task definition family, Cognito pool name.
    pub stack: String,
    pub target_group: String,
    pub database: String,
    pub database_user: String,
    pub secret: String,
    pub access_point_root: String,
    pub access_point_token: String,
    pub user_pool: String,
    pub cognito_domain: String,
    pub log_stream_prefix: String,
}

impl ResourceNames {
    pub fn derive(tenant: &TenantId, environment: Environment) -> Self {
        let env = environment.short();
        let stack = format!("bbws-{env}-{tenant}");
        let underscored = tenant.as_str().replace('-', "_");
        Self {
            target_group: fit(&stack, limits::TARGET_GROUP_NAME, '-'),
            database: fit(
                &format!("tenant_{underscored}_{env}_db"),
                limits::MYSQL_DATABASE,
                '_',
            ),
            database_user: fit(&format!("t_{underscored}_{env}"), limits::MYSQL_USER, '_'),
            secret: fit(
                &format!("bbws/{env}/tenants/{tenant}/database"),
                limits::SECRET_NAME,
                '-',
            ),
            access_point_root: format!("/tenant-{tenant}"),
            access_point_token: fit(&stack, limits::EFS_CREATION_TOKEN, '-'),
            user_pool: fit(&stack, limits::COGNITO_POOL_NAME, '-'),
            cognito_domain: cognito_domain(&stack),
            log_stream_prefix: tenant.as_str().to_owned(),
            stack: fit(&stack, limits::ECS_NAME, '-'),
        }
    }

    /// What every ECS name (service, task definition families) of `environment` starts
    /// with: `bbws-{env}-`.
    pub fn stack_prefix(environment: Environment) -> String {
        format!("bbws-{}-", environment.short())
    }

    /// A further database of one operation (a restore's `r`, a backup check's `v`): the
    /// tenant database's name and `_{tag}{first 8 characters of the operation id}`, fitted
    /// to MySQL's 64 characters.
    pub fn operation_database(&self, tag: char, operation_id: &str) -> String {
        let short = &operation_id[..operation_id.len().min(OPERATION_SHORT)];
        let suffix = format!("_{tag}{short}");
        format!(
            "{}{suffix}",
            fit(&self.database, limits::MYSQL_DATABASE - suffix.len(), '_')
        )
    }

    /// Whether `name` is this tenant's database or one of its operations' databases
    /// ([`ResourceNames::operation_database`]).
    pub fn is_database(&self, name: &str) -> bool {
        if name == self.database {
            return true;
        }
        // `_{tag}{short}`: 3 to 10 characters, a letter after the underscore.
        (3..=OPERATION_SHORT + 2).any(|len| {
            let Some(cut) = name.len().checked_sub(len) else {
                return false;
            };
            let (base, suffix) = name.split_at(cut);
            let mut chars = suffix.chars();
            chars.next() == Some('_')
                && chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
                && base == fit(&self.database, limits::MYSQL_DATABASE - len, '_')
        })
    }

    /// The IAM role the tasks of instance `instance` run as: `bbws-{env}-{tenant}-{instance}`
    /// (cut with a hash at 64). Unlike the other names it includes the instance id: the
    /// role's policy names the instance's own access point, and a failed instance keeping
    /// its resources must not hold the name its successor needs.
    pub fn task_role(&self, instance: &str) -> String {
        fit(
            &format!("{}-{instance}", self.stack),
            limits::IAM_ROLE_NAME,
            '-',
        )
    }

    /// The site's host name: `{tenant}.{domain}`.
    pub fn host(tenant: &TenantId, domain: &str) -> String {
        format!("{tenant}.{domain}")
    }
}

/// Cognito refuses domain prefixes containing `aws`, `amazon` or `cognito`; such tenants get
/// a prefix made of the environment and a hash only.
fn cognito_domain(stack: &str) -> String {
    let fitted = fit(stack, limits::COGNITO_DOMAIN, '-');
    if ["aws", "amazon", "cognito"]
        .iter()
        .any(|reserved| fitted.contains(reserved))
    {
        return format!("bbws-{}", short_hash(stack));
    }
    fitted
}

/// The unified tag keys, under a configurable prefix (default `bbws`).
pub mod tag_keys {
    pub const TENANT_ID: &str = "tenant-id";
    pub const ENVIRONMENT: &str = "environment";
    pub const MANAGED_BY: &str = "managed-by";
    pub const COMPONENT: &str = "component";
    pub const PROJECT: &str = "project";
    pub const COST_CENTER: &str = "cost-center";
    pub const OPPORTUNITY: &str = "opportunity";
    /// The instance that owns the resource: names are per (tenant, environment), so two
    /// instances of one tenant (one failed, one live) can meet the same names; only this
    /// tag tells whose a resource is.
    pub const INSTANCE_ID: &str = "instance-id";
}

/// What goes into the unified tags besides the resource's component.
#[derive(Debug, Clone)]
pub struct TagContext<'a> {
    pub prefix: &'a str,
    pub tenant: &'a TenantId,
    /// The owning instance's id (within the tenant).
    pub instance: &'a str,
    pub environment: Environment,
    pub project: &'a str,
    pub cost_center: &'a str,
    pub opportunity: &'a str,
    /// The instance's labels (validated against AWS's tag rules), applied after the
    /// service's own tags; a label whose key is one of those is left out.
    pub labels: &'a BTreeMap<String, String>,
}

impl TagContext<'_> {
    /// Every tag of one resource: [`TagContext::own_tags`], then the labels.
    pub fn tags(&self, component: &str) -> Vec<(String, String)> {
        let mut tags = self.own_tags(component);
        for (key, value) in self.labels {
            if !tags.iter().any(|(own, _)| own.eq_ignore_ascii_case(key)) {
                tags.push((key.clone(), value.clone()));
            }
        }
        tags
    }

    /// The unified tags for one resource (`component` says which: `efs`, `database`, …).
    pub fn own_tags(&self, component: &str) -> Vec<(String, String)> {
        let key = |name: &str| format!("{}:{name}", self.prefix);
        vec![
            (key(tag_keys::TENANT_ID), self.tenant.to_string()),
            (key(tag_keys::INSTANCE_ID), self.instance.to_owned()),
            (
                key(tag_keys::ENVIRONMENT),
                self.environment.as_str().to_owned(),
            ),
            (key(tag_keys::MANAGED_BY), "instance-manager".to_owned()),
            (key(tag_keys::COMPONENT), component.to_owned()),
            (key(tag_keys::PROJECT), self.project.to_owned()),
            (key(tag_keys::COST_CENTER), self.cost_center.to_owned()),
            (key(tag_keys::OPPORTUNITY), self.opportunity.to_owned()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn mysql_identifier(s: &str) -> bool {
        s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    #[test]
    fn operation_databases_are_recognised_as_the_tenants() {
        let long = "a".repeat(TenantId::MAX_LEN);
        for tenant_id in ["acme", "shop-1", long.as_str()] {
            let names = ResourceNames::derive(&tenant(tenant_id), Environment::Dev);
            let restored = names.operation_database('r', "0123456789abcdef");
            assert!(restored.len() <= limits::MYSQL_DATABASE, "{restored}");
            assert!(names.is_database(&names.database));
            assert!(names.is_database(&restored), "{restored}");
            assert!(names.is_database(&names.operation_database('v', "ab")));
            let other = ResourceNames::derive(&tenant("other"), Environment::Dev);
            assert!(!other.is_database(&restored));
            assert!(!names.is_database(&format!("{}_x", names.database)));
            let sit = ResourceNames::derive(&tenant(tenant_id), Environment::Sit);
            assert!(!sit.is_database(&restored));
        }
        let acme = ResourceNames::derive(&tenant("acme"), Environment::Dev);
        let restored = acme.operation_database('r', "0123456789abcdef");
        assert_eq!(restored, "tenant_acme_dev_db_r01234567");
        assert!(!acme.is_database("tenant_acme_dev_dbx"));
        assert!(!acme.is_database("tenant_acme_dev_db_"));
        assert_eq!(ResourceNames::stack_prefix(Environment::Sit), "bbws-sit-");
    }

    #[test]
    fn short_tenants_keep_readable_names() {
        let names = ResourceNames::derive(&tenant("acme"), Environment::Prod);
        assert_eq!(names.stack, "bbws-prod-acme");
        assert_eq!(names.target_group, "bbws-prod-acme");
        assert_eq!(names.database, "tenant_acme_prod_db");
        assert_eq!(names.database_user, "t_acme_prod");
        assert_eq!(names.secret, "bbws/prod/tenants/acme/database");
        assert_eq!(names.access_point_root, "/tenant-acme");
        assert_eq!(
            ResourceNames::host(&tenant("acme"), "sites.example"),
            "acme.sites.example"
        );
    }

    #[test]
    fn task_roles_are_per_instance_and_fit_iam() {
        let names = ResourceNames::derive(&tenant("acme"), Environment::Prod);
        assert_eq!(names.task_role("wp"), "bbws-prod-acme-wp");
        assert_ne!(names.task_role("wp"), names.task_role("wp2"));
        let longest =
            ResourceNames::derive(&tenant(&"z".repeat(TenantId::MAX_LEN)), Environment::Prod);
        let (one, two) = (
            longest.task_role(&"a".repeat(63)),
            longest.task_role(&"b".repeat(63)),
        );
        assert_eq!(one.len(), limits::IAM_ROLE_NAME);
        assert_ne!(one, two);
        // IAM role names: [\w+=,.@-].
        assert!(one.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn longest_tenants_fit_every_limit() {
        let long = tenant(format!("a{}", "b-".repeat(19)).trim_end_matches('-'));
        let longest = tenant(&"z".repeat(TenantId::MAX_LEN));
        for t in [long, longest] {
            for env in Environment::ALL {
                let n = ResourceNames::derive(&t, env);
                assert!(
                    n.target_group.len() <= limits::TARGET_GROUP_NAME,
                    "{}",
                    n.target_group
                );
                assert!(n.database.len() <= limits::MYSQL_DATABASE);
                assert!(
                    n.database_user.len() <= limits::MYSQL_USER,
                    "{}",
                    n.database_user
                );
                assert!(n.cognito_domain.len() <= limits::COGNITO_DOMAIN);
                assert!(n.access_point_token.len() <= limits::EFS_CREATION_TOKEN);
                assert!(mysql_identifier(&n.database) && mysql_identifier(&n.database_user));
                assert!(!n.target_group.starts_with('-') && !n.target_group.ends_with('-'));
                assert!(
                    n.target_group
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-')
                );
            }
        }
    }

    #[test]
    fn names_never_collide_across_tenants_and_environments() {
        // Tenants that share long prefixes are the hard case for truncation.
        let mut tenants: Vec<TenantId> = (0..3000)
            .map(|i| tenant(&format!("customer-with-a-long-name-{i:05}")))
            .collect();
        tenants.extend((0..500).map(|i| tenant(&format!("t{i:03}"))));
        let mut seen = HashSet::new();
        for t in &tenants {
            for env in Environment::ALL {
                let n = ResourceNames::derive(t, env);
                for (kind, name) in [
                    ("tg", &n.target_group),
                    ("db", &n.database),
                    ("user", &n.database_user),
                    ("cognito", &n.cognito_domain),
                    ("stack", &n.stack),
                ] {
                    assert!(seen.insert((kind, name.clone())), "{kind} {name} collides");
                }
            }
        }
    }

    #[test]
    fn cut_names_cannot_equal_natural_ones() {
        let natural = "x".repeat(31);
        assert_eq!(fit(&natural, 32, '-'), natural);
        let cut = fit(&"x".repeat(32), 32, '-');
        assert_eq!(cut.len(), 32);
        assert_ne!(cut, "x".repeat(32));
    }

    #[test]
    fn cognito_domains_avoid_reserved_words() {
        for t in ["aws-shop", "amazonia", "my-cognito", "acme"] {
            let n = ResourceNames::derive(&tenant(t), Environment::Dev);
            assert!(
                !["aws", "amazon", "cognito"]
                    .iter()
                    .any(|w| n.cognito_domain.contains(w)),
                "{}",
                n.cognito_domain
            );
        }
    }

    #[test]
    fn unified_tags() {
        let t = tenant("acme");
        let ctx = TagContext {
            prefix: "bbws",
            tenant: &t,
            instance: "wp",
            environment: Environment::Sit,
            project: "wordpress",
            cost_center: "cc-1",
            opportunity: "opp-9",
            labels: &BTreeMap::from([
                ("team".to_owned(), "web".to_owned()),
                ("bbws:component".to_owned(), "spoof".to_owned()),
            ]),
        };
        let with_labels = ctx.tags("efs");
        assert!(with_labels.contains(&("team".into(), "web".into())));
        assert!(!with_labels.contains(&("bbws:component".into(), "spoof".into())));
        // Our own tags and the one label that does not collide with them.
        assert_eq!(with_labels.len(), 9, "{with_labels:?}");
        let tags = ctx.own_tags("efs");
        assert!(tags.contains(&("bbws:tenant-id".into(), "acme".into())));
        assert!(tags.contains(&("bbws:environment".into(), "SIT".into())));
        assert!(tags.contains(&("bbws:managed-by".into(), "instance-manager".into())));
        assert!(tags.contains(&("bbws:component".into(), "efs".into())));
        assert!(tags.contains(&("bbws:instance-id".into(), "wp".into())));
        assert_eq!(tags.len(), crate::domain::spec::OWN_TAGS);
    }
}
