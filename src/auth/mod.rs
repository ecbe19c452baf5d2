//! Who is calling: authentication of every API call, and the principal it yields.
//!
//! The server's [`AuthLayer`] runs before any service. It reads `authorization: Bearer …`,
//! turns it into a [`Principal`] with an [`Authenticator`], and puts the principal into the
//! request's extensions, where the handlers find it ([`principal`]) and authorise it. A call
//! without valid credentials never reaches a handler: it gets UNAUTHENTICATED.
//!
//! Health (`grpc.health.v1`) and reflection are open to everyone: load balancers probe health
//! without credentials, and reflection describes only the public contract.
//!
//! Running without authentication is a deliberate choice (`auth.disabled = true`, which
//! `make dev` sets); every call then acts as [`Principal::unauthenticated`], an admin of
//! every tenant, and the server warns at start-up.

pub mod authz;
pub mod jwt;
pub mod layer;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::TenantId;

pub use jwt::{JwtConfig, JwtValidator};
pub use layer::AuthLayer;

/// What a principal may do. Ordered: each role may do everything the ones before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: get, list, watch, health, usage, logs.
    #[default]
    Viewer,
    /// Viewer, plus the lifecycle operations (create, update, scale, suspend, resume,
    /// restart, backup, restore, retry).
    Operator,
    /// Operator, plus what cannot be undone or spans tenants (delete instances and backups,
    /// the audit trail).
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(value: &str) -> Option<Role> {
        match value.trim().to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// Authentication is switched off (`auth.disabled`): nobody proved anything.
    Disabled,
    /// A static API token from the configuration.
    StaticToken,
    /// A bearer JWT validated against the configured JWKS.
    Jwt,
}

/// The caller of one request, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who: the token's configured name, or the JWT's `sub` (prefixed by its issuer's
    /// kind), as recorded in the audit trail. Never a secret.
    pub subject: String,
    pub role: Role,
    /// `Some`: may see and act on this tenant only. `None`: every tenant.
    pub tenant: Option<TenantId>,
    pub method: AuthMethod,
}

impl Principal {
    /// The principal of every call when authentication is disabled.
    pub fn unauthenticated() -> Self {
        Self {
            subject: "anonymous (authentication disabled)".into(),
            role: Role::Admin,
            tenant: None,
            method: AuthMethod::Disabled,
        }
    }

    /// Whether the principal may see `tenant` at all (the other tenants' resources are
    /// NOT_FOUND to it).
    pub fn sees_tenant(&self, tenant: &TenantId) -> bool {
        self.tenant.as_ref().is_none_or(|own| own == tenant)
    }

    /// Whether the principal's role includes `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.role >= role
    }
}

/// The principal the [`AuthLayer`] attached to a request. A request that did not pass
/// through the layer (never the case in a running server) has none; callers treat that as
/// unauthenticated.
pub fn principal<T>(request: &tonic::Request<T>) -> Option<&Principal> {
    request.extensions().get::<Principal>()
}

/// `[auth]` of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Serve without authentication: every call is an admin of every tenant. Must be asked
    /// for; the server warns at start-up. Without it, at least one way to authenticate
    /// (`tokens` or `jwt`) must be configured.
    pub disabled: bool,
    /// Static API tokens for automation.
    pub tokens: Vec<StaticTokenConfig>,
    /// Bearer JWTs (Cognito) validated against a JWKS.
    pub jwt: Option<JwtConfig>,
}

/// One static API token. Only its SHA-256 is configured, so the configuration (and its
/// dump) never holds a usable credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTokenConfig {
    /// Who the token is, as the audit trail records it (for example `ci-deployer`).
    pub name: String,
    /// Lower-case hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    pub role: Role,
    /// The only tenant the token may see; absent: every tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Why a configuration's `[auth]` is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "no authentication configured: add [[auth.tokens]] or [auth.jwt] (see the README's \"Authentication and TLS\"), or set auth.disabled = true (serve --no-auth) to serve without it"
    )]
    NothingConfigured,
    #[error("auth.jwt.{field}: {reason}")]
    Jwt { field: &'static str, reason: String },
    #[error("auth.tokens[{index}].{field}: {reason}")]
    Token {
        index: usize,
        field: &'static str,
        reason: String,
    },
}

impl AuthConfig {
    /// Checks each entry. Whether any way to authenticate is configured at all is checked
    /// when a server starts ([`Authenticator::from_config`]), so that other subcommands
    /// (bootstrap, the client) need no `[auth]`.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (index, token) in self.tokens.iter().enumerate() {
            let bad = |field, reason: &str| AuthConfigError::Token {
                index,
                field,
                reason: reason.into(),
            };
            if token.name.trim().is_empty() || token.name.len() > 128 {
                return Err(bad("name", "must be 1-128 characters"));
            }
            if !names.insert(token.name.as_str()) {
                return Err(bad("name", "is used by another token"));
            }
            if token.sha256.len() != 64
                || !token
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad("sha256", "must be 64 lower-case hex digits"));
            }
            if !hashes.insert(token.sha256.as_str()) {
                return Err(bad("sha256", "is the hash of another token too"));
            }
            if let Some(tenant) = &token.tenant {
                TenantId::parse(tenant).map_err(|e| bad("tenant", &e.to_string()))?;
            }
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate()
                .map_err(|(field, reason)| AuthConfigError::Jwt { field, reason })?;
        }
        Ok(())
    }
}

/// Why a request's credentials were refused. The message goes to the caller: it says what
/// is wrong with the credential, never what the server expected it to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <token>`")]
    Malformed,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("{0}")]
    Rejected(String),
    /// Authenticated, but the token grants none of the roles: PERMISSION_DENIED (the
    /// caller is known, and a new token will not help until the role is granted).
    #[error("the token grants no role: it needs admin, operator or viewer")]
    NoRole,
}

impl AuthError {
    /// The gRPC code the caller gets.
    pub fn code(&self) -> tonic::Code {
        match self {
            AuthError::NoRole => tonic::Code::PermissionDenied,
            _ => tonic::Code::Unauthenticated,
        }
    }
}

/// Turns a request's bearer credential into a principal.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    disabled: bool,
    /// (sha256 of the token, its principal).
    tokens: Vec<([u8; 32], Principal)>,
    jwt: Option<Arc<JwtValidator>>,
}

impl Authenticator {
    /// Every call is [`Principal::unauthenticated`].
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            tokens: Vec::new(),
            jwt: None,
        }
    }

    /// From a validated `[auth]`.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        config.validate()?;
        if !config.disabled && config.tokens.is_empty() && config.jwt.is_none() {
            return Err(AuthConfigError::NothingConfigured);
        }
        let tokens = config
            .tokens
            .iter()
            .map(|token| {
                let mut hash = [0u8; 32];
                // Validated above: 64 hex digits.
                if let Ok(bytes) = hex::decode(&token.sha256) {
                    hash.copy_from_slice(&bytes);
                }
                (
                    hash,
                    Principal {
                        subject: format!("token:{}", token.name),
                        role: token.role,
                        tenant: token
                            .tenant
                            .as_deref()
                            .and_then(|tenant| TenantId::parse(tenant).ok()),
                        method: AuthMethod::StaticToken,
                    },
                )
            })
            .collect();
        let jwt = match &config.jwt {
            Some(jwt) => Some(Arc::new(
                JwtValidator::new(jwt.clone())
                    .map_err(|(field, reason)| AuthConfigError::Jwt { field, reason })?,
            )),
            None => None,
        };
        Ok(Self {
            disabled: config.disabled,
            tokens,
            jwt,
        })
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The principal of a request with these headers.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, AuthError> {
        if self.disabled {
            return Ok(Principal::unauthenticated());
        }
        let token = bearer(headers)?;
        if let Some(principal) = self.static_token(token) {
            return Ok(principal);
        }
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => jwt.authenticate(token).await,
            _ => Err(AuthError::Invalid),
        }
    }

    fn static_token(&self, token: &str) -> Option<Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every configured hash is compared, in constant time each, so the time taken
        // says nothing about which (if any) matched.
        let mut found = None;
        for (expected, principal) in &self.tokens {
            if constant_time_eq(expected, &hash) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Three base64url segments: what a JWS in compact form looks like (a static token never
/// needs to).
fn looks_like_jwt(token: &str) -> bool {
    let segments: Vec<&str> = token.split('.').collect();
    segments.len() == 3
        && segments.iter().take(2).all(|s| !s.is_empty())
        && segments.iter().all(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex SHA-256 of a token, as `[[auth.tokens]]` wants it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tokens: &[(&str, &str, Role, Option<&str>)]) -> AuthConfig {
        AuthConfig {
            disabled: false,
            jwt: None,
            tokens: tokens
                .iter()
                .map(|(name, token, role, tenant)| StaticTokenConfig {
                    name: (*name).into(),
                    sha256: token_sha256(token),
                    role: *role,
                    tenant: tenant.map(str::to_owned),
                })
                .collect(),
        }
    }

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[tokio::test]
    async fn a_static_token_yields_its_configured_principal() {
        let auth = Authenticator::from_config(&config(&[
            ("ops", "s3cret-ops", Role::Operator, None),
            ("acme-view", "s3cret-acme", Role::Viewer, Some("acme")),
        ]))
        .unwrap();
        let ops = auth
            .authenticate(&headers("Bearer s3cret-ops"))
            .await
            .unwrap();
        assert_eq!(ops.subject, "token:ops");
        assert_eq!(ops.role, Role::Operator);
        assert_eq!(ops.tenant, None);
        let acme = auth
            .authenticate(&headers("bearer  s3cret-acme"))
            .await
            .unwrap();
        assert_eq!(acme.tenant, Some(TenantId::parse("acme").unwrap()));
        assert!(acme.sees_tenant(&TenantId::parse("acme").unwrap()));
        assert!(!acme.sees_tenant(&TenantId::parse("globex").unwrap()));
    }

    #[tokio::test]
    async fn missing_malformed_and_unknown_tokens_are_refused() {
        let auth =
            Authenticator::from_config(&config(&[("ops", "s3cret", Role::Admin, None)])).unwrap();
        assert_eq!(
            auth.authenticate(&http::HeaderMap::new()).await,
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.authenticate(&headers("Basic b3BzOnMzY3JldA==")).await,
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(&headers("Bearer ")).await,
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.authenticate(&headers("Bearer s3cret2")).await,
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn nothing_configured_must_be_asked_for() {
        assert_eq!(
            Authenticator::from_config(&AuthConfig::default()).err(),
            Some(AuthConfigError::NothingConfigured)
        );
        let off = AuthConfig {
            disabled: true,
            ..AuthConfig::default()
        };
        assert!(Authenticator::from_config(&off).unwrap().is_disabled());
    }

    #[test]
    fn bad_token_entries_are_refused_by_field() {
        let mut bad = config(&[("ops", "x", Role::Admin, None)]);
        bad.tokens[0].sha256 = "ABC".into();
        assert!(matches!(
            bad.validate(),
            Err(AuthConfigError::Token {
                field: "sha256",
                ..
            })
        ));
        let twice = config(&[
            ("a", "same", Role::Admin, None),
            ("b", "same", Role::Viewer, None),
        ]);
        assert!(matches!(
            twice.validate(),
            Err(AuthConfigError::Token {
                field: "sha256",
                ..
            })
        ));
        let tenant = config(&[("a", "t", Role::Admin, Some("Not A Tenant!"))]);
        assert!(matches!(
            tenant.validate(),
            Err(AuthConfigError::Token {
                field: "tenant",
                ..
            })
        ));
    }

    #[test]
    fn roles_are_ordered() {
        let viewer = Principal {
            role: Role::Viewer,
            ..Principal::unauthenticated()
        };
        assert!(viewer.has_role(Role::Viewer));
        assert!(!viewer.has_role(Role::Operator));
        assert!(Principal::unauthenticated().has_role(Role::Admin));
    }
}
