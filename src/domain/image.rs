//! Which WordPress images tenants may run: repositories on an allow-list, compared on whole
//! path segments after Docker's normalisation (`wordpress` is
//! `docker.io/library/wordpress`), so an image that merely starts with an allowed name
//! (`wordpress-evil`) or hides under another registry is refused.

use std::fmt;

/// The repository of the server's default image (`wordpress`), normalised: what the
/// allow-list holds unless configured otherwise.
pub const DEFAULT_ALLOWED_REPOSITORIES: [&str; 1] = ["docker.io/library/wordpress"];

/// Docker Hub's canonical registry name, and the names that mean the same registry.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];

/// The repositories (and repository prefixes) images may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Each entry's normalised path segments; an image is allowed when its own segments
    /// start with one entry's.
    allowed: Vec<Vec<String>>,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        Self::new(DEFAULT_ALLOWED_REPOSITORIES).expect("the default allow-list is valid")
    }
}

impl ImagePolicy {
    /// An allow-list of `registry/repository` prefixes (each a repository name as
    /// [`check_repository`] accepts it). Empty: no image is allowed.
    pub fn new<I, S>(entries: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut allowed = Vec::new();
        for entry in entries {
            let entry = entry.as_ref();
            check_repository(entry).map_err(|why| format!("{entry:?} {why}"))?;
            allowed.push(normalize(entry));
        }
        Ok(Self { allowed })
    }

    /// The empty list: no image is allowed.
    pub fn nothing() -> Self {
        Self {
            allowed: Vec::new(),
        }
    }

    /// Whether `repository` (a syntactically valid repository name) is on the list.
    pub fn allows(&self, repository: &str) -> bool {
        let image = normalize(repository);
        self.allowed
            .iter()
            .any(|prefix| image.len() >= prefix.len() && image[..prefix.len()] == prefix[..])
    }

    /// The refusal for `repository`, naming what is allowed; `None` if it is allowed.
    pub fn refusal(&self, repository: &str) -> Option<String> {
        (!self.allows(repository)).then(|| {
            format!(
                "repository {repository} is not allowed; images must come from: {self} \
                 (the server's allowed_image_repositories)"
            )
        })
    }
}

impl fmt::Display for ImagePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allowed.is_empty() {
            return f.write_str("(nothing)");
        }
        let names: Vec<String> = self.allowed.iter().map(|s| s.join("/")).collect();
        f.write_str(&names.join(", "))
    }
}

/// `repository`'s path segments as a registry would resolve them: a first segment that is
/// no host name (no `.` or `:`, not `localhost`) means Docker Hub, and a single name there
/// means `library/`.
fn normalize(repository: &str) -> Vec<String> {
    let mut segments: Vec<String> = repository.split('/').map(str::to_owned).collect();
    let first = segments[0].as_str();
    let has_registry =
        segments.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost");
    if !has_registry {
        segments.insert(0, DOCKER_HUB.to_owned());
    } else if DOCKER_HUB_ALIASES.contains(&first) {
        segments[0] = DOCKER_HUB.to_owned();
    }
    if segments[0] == DOCKER_HUB && segments.len() == 2 {
        segments.insert(1, "library".to_owned());
    }
    segments
}

/// A container image *repository* such as `wordpress` or
/// `123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws/wordpress`: lower-case path segments
/// separated by `/`, a registry host that may carry a `:port`, and neither a tag nor a
/// digest (the tag is `wordpress_version`; a digest would bypass it).
pub fn check_repository(value: &str) -> Result<(), String> {
    const SYNTAX: &str = "must be a container image repository such as wordpress or \
                          123456789012.dkr.ecr.eu-west-1.amazonaws.com/wordpress (lower-case \
                          letters, digits, '.', '_', '-' in '/'-separated parts; a registry \
                          host may have a :port)";
    if value.is_empty() || value.len() > 255 {
        return Err(SYNTAX.into());
    }
    if value.contains('@') {
        return Err(
            "must not carry a digest (@sha256:...): name the repository only; the tag goes in \
             wordpress_version"
                .into(),
        );
    }
    let segments: Vec<&str> = value.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let name = match segment.split_once(':') {
            // Only a registry host (the first of several parts) may have a port.
            Some((host, port)) if i == 0 && segments.len() > 1 => {
                if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
                    return Err(SYNTAX.into());
                }
                host
            }
            Some(_) => {
                return Err(
                    "must not carry a tag (:...): name the repository only; the tag goes in \
                     wordpress_version"
                        .into(),
                );
            }
            None => segment,
        };
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric())
            && !name.contains("..");
        if !ok {
            return Err(SYNTAX.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_names_without_tag_or_digest() {
        for good in [
            "wordpress",
            "bitnami/wordpress",
            "docker.io/library/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws/wordpress",
            "localhost:5000/wp",
            "public.ecr.aws/docker/library/wordpress",
        ] {
            assert!(check_repository(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "wordpress:latest",
            "wordpress:6.7-php8.3-apache",
            "docker.io/library/wordpress:6",
            "localhost:5000/wp:6",
            "wordpress@sha256:0123456789abcdef",
            "docker.io/library/wordpress@sha256:00",
            "registry:port/wp",
            "Wordpress",
            "wp;rm -rf",
            "a//b",
            "/wordpress",
            "wordpress/",
            "a/../b",
            "-wp",
        ] {
            assert!(check_repository(bad).is_err(), "{bad:?}");
        }
        assert!(
            check_repository("wordpress:latest")
                .unwrap_err()
                .contains("tag")
        );
        assert!(
            check_repository("wordpress@sha256:00")
                .unwrap_err()
                .contains("digest")
        );
    }

    #[test]
    fn the_allow_list_matches_whole_segments_after_normalisation() {
        let policy = ImagePolicy::new([
            "docker.io/library/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws",
        ])
        .unwrap();
        for allowed in [
            "wordpress",
            "library/wordpress",
            "docker.io/wordpress",
            "docker.io/library/wordpress",
            "index.docker.io/library/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws/team/wp",
        ] {
            assert!(policy.allows(allowed), "{allowed}");
            assert_eq!(policy.refusal(allowed), None);
        }
        for refused in [
            "wordpress-evil",
            "docker.io/library/wordpress-evil",
            "docker.io/library/wordpressx",
            "evil/wordpress",
            "docker.io/evil/wordpress",
            "ghcr.io/library/wordpress",
            "evil.example/docker.io/library/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws-evil/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/wordpress",
            "999999999999.dkr.ecr.eu-west-1.amazonaws.com/bbws/wordpress",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.example/bbws",
        ] {
            assert!(!policy.allows(refused), "{refused}");
            let why = policy.refusal(refused).unwrap();
            assert!(why.contains(refused) && why.contains("docker.io/library/wordpress"));
        }
        // The default list allows the server's default image, and only that repository.
        let default = ImagePolicy::default();
        assert!(default.allows(crate::domain::spec::DEFAULT_WORDPRESS_IMAGE));
        assert!(!default.allows("bitnami/wordpress"));
        // An empty list allows nothing; a bad entry is refused with its reason.
        assert!(
            !ImagePolicy::new(Vec::<String>::new())
                .unwrap()
                .allows("wordpress")
        );
        assert!(!ImagePolicy::nothing().allows("wordpress"));
        let error = ImagePolicy::new(["wordpress:latest"]).unwrap_err();
        assert!(
            error.contains("wordpress:latest") && error.contains("tag"),
            "{error}"
        );
    }
}
