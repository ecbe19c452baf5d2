//! Bearer JWTs (Cognito in production) validated against a JWKS from a URL or a file.
//!
//! Only RS256 and ES256 are accepted: `alg: none`, the HMAC family (the classic "sign with
//! the public key as an HMAC secret" forgery) and everything else are refused before any
//! key is looked at. The key is chosen by the token's `kid`, and must be of the family the
//! header names. Issuer, expiry and not-before (with a small leeway) are checked by
//! `jsonwebtoken`; the audience is checked here because Cognito access tokens carry the
//! app client in `client_id` instead of `aud`.
//!
//! Keys are kept in memory. A token whose `kid` is unknown triggers a reload of the JWKS
//! (at most once per `jwks_min_refresh_secs`, so a flood of made-up key ids cannot turn
//! into a flood of fetches), so a rotated key is picked up without a restart; keys older
//! than `jwks_refresh_secs` are reloaded in the background on the next call. A failed
//! reload keeps the keys already known.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AuthError, AuthMethod, Principal, Role};
use crate::domain::TenantId;

/// `[auth.jwt]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` every token must carry, exactly (Cognito:
    /// `https://cognito-idp.REGION.amazonaws.com/POOL_ID`).
    pub issuer: String,
    /// The audience: a token's `aud` must contain it, or, for a token without `aud` (a
    /// Cognito access token), its `client_id` must equal it (the app client id).
    pub audience: String,
    /// Where the signing keys are published (Cognito: `{issuer}/.well-known/jwks.json`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A local JWKS file instead of `jwks_url` (re-read on the same schedule).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The claim holding the role: a list of names or one name; the highest of `admin`,
    /// `operator`, `viewer` present wins, other names are ignored.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// The claim holding the only tenant the caller may see; a token without it is
    /// platform staff and sees every tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (0..=300).
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Which Cognito tokens are accepted, by their `token_use` claim: `id` (the default:
    /// ID tokens carry custom attributes such as the tenant, access tokens do not, so a
    /// tenant user's access token would read as platform staff), `access` (a pool whose
    /// pre-token-generation trigger puts the tenant claim into access tokens), or `any`. A
    /// token without `token_use` (another identity provider) is not affected.
    #[serde(default = "default_token_use")]
    pub token_use: String,
    /// Keys older than this are reloaded (in the background, on the next call).
    #[serde(default = "default_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// At most one reload per this many seconds, whatever triggers it (1..=3600).
    #[serde(default = "default_min_refresh_secs")]
    pub jwks_min_refresh_secs: u64,
}

fn default_role_claim() -> String {
    "cognito:groups".into()
}
fn default_tenant_claim() -> String {
    "custom:tenant".into()
}
fn default_leeway_secs() -> u64 {
    30
}
fn default_token_use() -> String {
    "id".into()
}
fn default_refresh_secs() -> u64 {
    60 * 60
}
fn default_min_refresh_secs() -> u64 {
    30
}

impl JwtConfig {
    /// A configuration with the defaults for everything but these.
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_url: None,
            jwks_file: None,
            role_claim: default_role_claim(),
            tenant_claim: default_tenant_claim(),
            leeway_secs: default_leeway_secs(),
            token_use: default_token_use(),
            jwks_refresh_secs: default_refresh_secs(),
            jwks_min_refresh_secs: default_min_refresh_secs(),
        }
    }

    /// The first unusable field and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |field, reason: &str| Err((field, reason.to_owned()));
        if self.issuer.trim().is_empty() {
            return bad("issuer", "must not be empty");
        }
        if self.audience.trim().is_empty() {
            return bad("audience", "must not be empty (the app client id)");
        }
        match (&self.jwks_url, &self.jwks_file) {
            (Some(_), Some(_)) => return bad("jwks_url", "set jwks_url or jwks_file, not both"),
            (None, None) => return bad("jwks_url", "set jwks_url or jwks_file"),
            (Some(url), None) => {
                JwksUrl::parse(url).map_err(|reason| ("jwks_url", reason))?;
            }
            (None, Some(_)) => {}
        }
        if self.role_claim.trim().is_empty() {
            return bad("role_claim", "must not be empty");
        }
        if self.tenant_claim.trim().is_empty() {
            return bad("tenant_claim", "must not be empty");
        }
        if !["id", "access", "any"].contains(&self.token_use.as_str()) {
            return bad("token_use", "must be id, access or any");
        }
        if self.leeway_secs > 300 {
            return bad("leeway_secs", "must be at most 300");
        }
        if !(1..=3600).contains(&self.jwks_min_refresh_secs) {
            return bad("jwks_min_refresh_secs", "must be between 1 and 3600");
        }
        if self.jwks_refresh_secs < self.jwks_min_refresh_secs {
            return bad(
                "jwks_refresh_secs",
                "must be at least jwks_min_refresh_secs",
            );
        }
        Ok(())
    }
}

/// A JWKS URL taken apart for hyper: scheme, host, port and path.
#[derive(Debug, Clone)]
struct JwksUrl {
    https: bool,
    host: String,
    port: u16,
    uri: http::Uri,
}

impl JwksUrl {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?}: the scheme must be https:// (or http://)")),
        };
        let host = uri
            .host()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self {
            https,
            host,
            port,
            uri,
        })
    }
}

#[derive(Debug)]
enum JwksSource {
    Url(JwksUrl),
    File(PathBuf),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::Url(url) => write!(f, "{}", url.uri),
            JwksSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One usable verification key.
#[derive(Clone)]
struct Key {
    algorithm: Algorithm,
    key: Arc<DecodingKey>,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Key>,
    loaded_at: Option<Instant>,
}

/// A JWKS fetch or parse failure (logged; the keys already known stay in use).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {0}")]
    Io(String),
    #[error("fetching the JWKS: {0}")]
    Fetch(String),
    #[error("the JWKS is not valid JSON with a `keys` list: {0}")]
    Parse(String),
}

/// Validates bearer JWTs against the configured issuer, audience and JWKS.
pub struct JwtValidator {
    config: JwtConfig,
    source: JwksSource,
    keys: RwLock<Keys>,
    /// When the last reload was attempted; held while one runs, so reloads never overlap.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    background: AtomicBool,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .field("jwks", &self.source.to_string())
            .finish_non_exhaustive()
    }
}

impl JwtValidator {
    /// From a validated `[auth.jwt]`. A `jwks_file` is read now, so a missing or broken
    /// file stops the start; a `jwks_url` is fetched on the first token.
    pub fn new(config: JwtConfig) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        let source = match (&config.jwks_url, &config.jwks_file) {
            (Some(url), _) => JwksSource::Url(JwksUrl::parse(url).map_err(|e| ("jwks_url", e))?),
            (None, Some(path)) => JwksSource::File(path.clone()),
            (None, None) => return Err(("jwks_url", "set jwks_url or jwks_file".into())),
        };
        let mut keys = Keys::default();
        if let JwksSource::File(path) = &source {
            let text = std::fs::read(path)
                .map_err(|e| ("jwks_file", format!("cannot read {}: {e}", path.display())))?;
            keys.by_kid = parse_jwks(&text).map_err(|e| ("jwks_file", e.to_string()))?;
            keys.loaded_at = Some(Instant::now());
        }
        Ok(Self {
            config,
            source,
            keys: RwLock::new(keys),
            last_attempt: tokio::sync::Mutex::new(None),
            background: AtomicBool::new(false),
        })
    }

    /// The principal of a bearer JWT.
    pub async fn authenticate(self: &Arc<Self>, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Rejected(
                "token algorithm not accepted (RS256 or ES256 only)".into(),
            ));
        }
        let kid = header
            .kid
            .filter(|kid| !kid.is_empty() && kid.len() <= 256)
            .ok_or_else(|| AuthError::Rejected("token names no signing key (kid)".into()))?;
        self.refresh_if_stale();
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                // Perhaps a rotated key: reload (rate-limited) and look again.
                self.reload("unknown key id").await;
                self.key(&kid)
                    .ok_or_else(|| AuthError::Rejected("token signed by an unknown key".into()))?
            }
        };
        if key.algorithm != header.alg {
            return Err(AuthError::Invalid);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        // Checked below: Cognito access tokens name the audience in `client_id`.
        validation.validate_aud = false;
        let claims =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|error| match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                        AuthError::Rejected("token issuer not accepted".into())
                    }
                    _ => AuthError::Invalid,
                })?
                .claims;
        self.principal(&claims)
    }

    /// The principal of validated claims: audience, subject, role and tenant.
    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Result<Principal, AuthError> {
        let audience = self.config.audience.as_str();
        let audience_ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == audience,
            Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
            Some(_) => false,
            None => claims.get("client_id").and_then(Value::as_str) == Some(audience),
        };
        if !audience_ok {
            return Err(AuthError::Rejected("token audience not accepted".into()));
        }
        if self.config.token_use != "any" {
            match claims.get("token_use") {
                None => {}
                Some(Value::String(used)) if *used == self.config.token_use => {}
                Some(_) => {
                    return Err(AuthError::Rejected(format!(
                        "only {} tokens are accepted (token_use)",
                        self.config.token_use
                    )));
                }
            }
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty() && sub.len() <= 256)
            .ok_or(AuthError::Invalid)?;
        let role = roles_in(claims.get(&self.config.role_claim))
            .max()
            .ok_or(AuthError::NoRole)?;
        let tenant = match claims.get(&self.config.tenant_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(tenant)) => Some(TenantId::parse(tenant).map_err(|_| {
                AuthError::Rejected("token's tenant claim is not a tenant id".into())
            })?),
            Some(_) => {
                return Err(AuthError::Rejected(
                    "token's tenant claim is not a string".into(),
                ));
            }
        };
        Ok(Principal {
            subject: format!("jwt:{subject}"),
            role,
            tenant,
            method: AuthMethod::Jwt,
        })
    }

    fn key(&self, kid: &str) -> Option<Key> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.by_kid.get(kid).cloned()
    }

    /// Starts a background reload when the keys are older than `jwks_refresh_secs`.
    fn refresh_if_stale(self: &Arc<Self>) {
        let stale = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.loaded_at.is_some_and(|at| {
                at.elapsed() >= Duration::from_secs(self.config.jwks_refresh_secs)
            })
        };
        if !stale || self.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                this.reload("periodic").await;
                this.background.store(false, Ordering::Release);
            },
            tracing::info_span!("jwks_refresh"),
        ));
    }

    /// Reloads the JWKS unless a reload was attempted within `jwks_min_refresh_secs`.
    /// Returns whether it tried.
    async fn reload(&self, reason: &'static str) -> bool {
        let mut last = self.last_attempt.lock().await;
        let min = Duration::from_secs(self.config.jwks_min_refresh_secs);
        if last.is_some_and(|at| at.elapsed() < min) {
            tracing::debug!(reason, "jwks reload skipped: rate-limited");
            return false;
        }
        *last = Some(Instant::now());
        match self.load().await {
            Ok(by_kid) => {
                let count = by_kid.len();
                let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
                keys.by_kid = by_kid;
                keys.loaded_at = Some(Instant::now());
                tracing::info!(reason, keys = count, jwks = %self.source, "jwks loaded");
            }
            Err(error) => {
                tracing::warn!(reason, %error, jwks = %self.source, "jwks reload failed: keeping the known keys");
            }
        }
        true
    }

    async fn load(&self) -> Result<HashMap<String, Key>, JwksError> {
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| JwksError::Io(format!("{}: {e}", path.display())))?,
            JwksSource::Url(url) => tokio::time::timeout(FETCH_TIMEOUT, fetch(url))
                .await
                .map_err(|_| JwksError::Fetch("timed out".into()))??,
        };
        parse_jwks(&bytes)
    }
}

/// Bounds one JWKS fetch (the caller of a token with a new key waits for it).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Cognito's JWKS is a few KiB; anything this large is not a key set.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The role names in a claim: a list of strings, or one string.
fn roles_in(claim: Option<&Value>) -> impl Iterator<Item = Role> + '_ {
    let names: Vec<&str> = match claim {
        Some(Value::String(name)) => vec![name.as_str()],
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    names.into_iter().filter_map(Role::parse)
}

/// The usable keys of a JWKS document: signature keys with a `kid`, RSA (RS256) or P-256
/// (ES256); others are skipped.
fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, Key>, JwksError> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document =
        serde_json::from_slice(bytes).map_err(|e| JwksError::Parse(e.to_string()))?;
    let mut keys = HashMap::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            tracing::debug!("jwks: skipping a key of an unsupported kind");
            continue;
        };
        let (Some(kid), Some(algorithm)) = (jwk.common.key_id.clone(), algorithm_of(&jwk)) else {
            continue;
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                keys.insert(
                    kid,
                    Key {
                        algorithm,
                        key: Arc::new(key),
                    },
                );
            }
            Err(error) => tracing::warn!(%kid, %error, "jwks: skipping an unusable key"),
        }
    }
    Ok(keys)
}

/// The one algorithm a JWK may verify: RS256 for RSA, ES256 for P-256; none for anything
/// else (symmetric keys above all) or a key whose `use`/`alg` says otherwise.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return None;
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    match (jwk.common.key_algorithm, algorithm) {
        (None, _)
        | (Some(KeyAlgorithm::RS256), Algorithm::RS256)
        | (Some(KeyAlgorithm::ES256), Algorithm::ES256) => Some(algorithm),
        _ => None,
    }
}

/// `GET` the JWKS over HTTP/1.1 (rustls with the public roots for https).
async fn fetch(url: &JwksUrl) -> Result<Vec<u8>, JwksError> {
    use tokio_rustls::rustls;
    let fail = |what: &str, e: &dyn std::fmt::Display| JwksError::Fetch(format!("{what}: {e}"));
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| fail("connect", &e))?;
    let path = url
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let authority = url
        .uri
        .authority()
        .map_or_else(|| url.host.clone(), |a| a.to_string());
    if url.https {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("TLS setup", &e))?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| fail("server name", &e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS", &e))?;
        get(TokioIo::new(tls), &authority, &path).await
    } else {
        get(TokioIo::new(tcp), &authority, &path).await
    }
}

async fn get<T>(io: T, authority: &str, path: &str) -> Result<Vec<u8>, JwksError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let fail = |what: &str, e: &dyn std::fmt::Display| JwksError::Fetch(format!("{what}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fail("HTTP handshake", &e))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "instance-manager-jwks/1")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail("request", &e))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail("no response", &e))?;
        if response.status() != http::StatusCode::OK {
            return Err(JwksError::Fetch(format!("HTTP {}", response.status())));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| fail("reading the body", &e))?;
        Ok(body.to_bytes().to_vec())
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validator() -> JwtValidator {
        let mut config = JwtConfig::new("https://issuer.test", "client-1");
        config.jwks_url = Some("http://127.0.0.1:9/jwks.json".into());
        JwtValidator::new(config).unwrap()
    }

    fn claims(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn only_the_configured_kind_of_cognito_token_is_accepted() {
        let base = json!({"sub": "u", "aud": "client-1", "cognito:groups": ["viewer"]});
        let with_use = |used: &str| {
            let mut c = base.clone();
            c["token_use"] = json!(used);
            claims(c)
        };
        // The default, `id`: a Cognito access token (no custom attributes, so no tenant)
        // is refused; an ID token and a token of another provider are accepted.
        let v = validator();
        assert!(v.principal(&with_use("id")).is_ok());
        assert!(v.principal(&claims(base.clone())).is_ok());
        let refused = v.principal(&with_use("access")).unwrap_err();
        assert!(matches!(refused, AuthError::Rejected(ref why) if why.contains("token_use")));
        assert!(v.principal(&with_use("refresh")).is_err());

        let mut config = v.config.clone();
        config.token_use = "access".into();
        let access = JwtValidator::new(config.clone()).unwrap();
        assert!(access.principal(&with_use("access")).is_ok());
        assert!(access.principal(&with_use("id")).is_err());
        config.token_use = "any".into();
        let any = JwtValidator::new(config.clone()).unwrap();
        assert!(any.principal(&with_use("access")).is_ok());
        assert!(any.principal(&with_use("id")).is_ok());
        config.token_use = "both".into();
        assert_eq!(config.validate().unwrap_err().0, "token_use");
    }

    #[test]
    fn the_highest_known_role_wins_and_the_tenant_is_optional() {
        let v = validator();
        let p = v
            .principal(&claims(json!({
                "sub": "u1", "aud": "client-1",
                "cognito:groups": ["viewer", "other", "operator"],
                "custom:tenant": "acme"
            })))
            .unwrap();
        assert_eq!(p.subject, "jwt:u1");
        assert_eq!(p.role, Role::Operator);
        assert_eq!(p.tenant, Some(TenantId::parse("acme").unwrap()));
        let staff = v
            .principal(&claims(json!({
                "sub": "u2", "client_id": "client-1", "cognito:groups": "admin"
            })))
            .unwrap();
        assert_eq!((staff.role, staff.tenant), (Role::Admin, None));
    }

    #[test]
    fn audience_role_and_tenant_are_enforced() {
        let v = validator();
        let refused = |value: Value| v.principal(&claims(value)).unwrap_err();
        // aud present but wrong: client_id does not rescue it.
        assert!(matches!(
            refused(
                json!({"sub": "u", "aud": "other", "client_id": "client-1", "cognito:groups": ["admin"]})
            ),
            AuthError::Rejected(_)
        ));
        assert!(matches!(
            refused(json!({"sub": "u", "client_id": "other", "cognito:groups": ["admin"]})),
            AuthError::Rejected(_)
        ));
        assert_eq!(
            refused(json!({"sub": "u", "aud": ["x", "client-1"], "cognito:groups": ["Admins"]})),
            AuthError::NoRole
        );
        assert!(matches!(
            refused(
                json!({"sub": "u", "aud": "client-1", "cognito:groups": ["admin"], "custom:tenant": "Not A Tenant"})
            ),
            AuthError::Rejected(_)
        ));
        assert_eq!(
            refused(json!({"aud": "client-1", "cognito:groups": ["admin"]})),
            AuthError::Invalid
        );
    }

    #[test]
    fn only_rsa_and_p256_signature_keys_are_kept() {
        let document = json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "enc", "use": "enc", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "kid": "ec", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "kid": "lying", "alg": "RS256", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "weird", "kid": "w"}
        ]});
        let keys = parse_jwks(document.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["ec"]);
        assert_eq!(keys["ec"].algorithm, Algorithm::ES256);
        assert!(parse_jwks(b"{}").is_err());
    }

    #[test]
    fn config_is_checked_by_field() {
        let mut config = JwtConfig::new("https://issuer.test", "client-1");
        assert_eq!(config.validate().unwrap_err().0, "jwks_url");
        config.jwks_url = Some("ftp://x/jwks".into());
        assert_eq!(config.validate().unwrap_err().0, "jwks_url");
        config.jwks_url =
            Some("https://cognito-idp.eu-west-1.amazonaws.com/pool/.well-known/jwks.json".into());
        config.validate().unwrap();
        config.jwks_file = Some("/tmp/jwks.json".into());
        assert_eq!(config.validate().unwrap_err().0, "jwks_url");
        config.jwks_file = None;
        config.jwks_min_refresh_secs = 0;
        assert_eq!(config.validate().unwrap_err().0, "jwks_min_refresh_secs");
    }
}
