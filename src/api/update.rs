//! UpdateInstance (AIP-134 with AIP-154 etags): the fields named in `update_mask` take the
//! request's values.
//!
//! - Record-only fields (`labels`, `organization_name`, `contact_email`) change in the
//!   request's own transaction: the returned operation is already COMPLETED and nothing in
//!   AWS is touched. The new labels become tags of resources made from then on (a new
//!   task-definition revision, for example); existing resources keep the tags they were
//!   created with.
//! - Only `desired_count`, `cpu` and/or `memory_mib`: a scale (`Verb::Scale`, the instance is
//!   SCALING), as ScaleInstance would start it.
//! - Anything else (`wordpress_image`, `wordpress_version`, with or without the others): an
//!   update (`Verb::Update`, UPDATING) that rolls out a new task-definition revision.
//!
//! A mask path that is not a field of `Instance` or not updatable is INVALID_ARGUMENT
//! naming it; `*` (full replacement) is refused the same way. A field in the mask with its
//! zero value takes the default a create would give it (the tier's size, two tasks, the
//! server's image), as AIP-134 asks. A mask whose values change nothing is INVALID_ARGUMENT.
//! A stale `etag` is ABORTED, and so is an update racing another change of the instance
//! (the instance is written conditionally on the version that was read).

use crate::domain::spec::SpecInput;
use crate::domain::{
    Instance, InstanceName, InstanceSpec, InstanceState, OperationStatus, RequestId, Timestamp,
    Verb, Violations,
};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;
use crate::store::Write;
use crate::workflow::{rollout, scale, update};

use super::error::{ApiError, ApiResult, reason};
use super::lifecycle::{busy, fingerprint, optional_request_id, wrong_state};
use super::{Api, convert};

/// Paths UpdateInstance accepts.
pub const UPDATABLE: [&str; 9] = [
    "wordpress_image",
    "wordpress_version",
    "cpu",
    "memory_mib",
    "desired_count",
    "labels",
    "organization_name",
    "contact_email",
    "custom_domains",
];

/// Fields of `Instance` that exist but cannot be changed by UpdateInstance, and why.
const NOT_UPDATABLE: [(&str, &str); 17] = [
    ("name", "identifies the instance"),
    ("environment", "is immutable"),
    ("tier", "is immutable; change cpu and memory_mib instead"),
    ("opportunity_id", "is immutable"),
    ("cost_center", "is immutable"),
    ("state", "is output only"),
    ("current_operation", "is output only"),
    ("url", "is output only"),
    ("resources", "is output only"),
    ("create_time", "is output only"),
    ("update_time", "is output only"),
    ("state_change_time", "is output only"),
    ("etag", "is output only; send it in instance.etag"),
    ("failure_reason", "is output only"),
    ("load_balancer", "is output only"),
    ("dns_records", "is output only"),
    ("custom_domain_statuses", "is output only"),
];

/// Checks the mask's paths; returns them sorted and without duplicates.
fn check_mask(mask: Option<&prost_types::FieldMask>, violations: &mut Violations) -> Vec<String> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        violations.add(
            "update_mask",
            format!(
                "is required: name the fields to change ({})",
                UPDATABLE.join(", ")
            ),
        );
        return Vec::new();
    }
    let mut accepted = Vec::new();
    for path in paths {
        if UPDATABLE.contains(&path.as_str()) {
            if !accepted.contains(path) {
                accepted.push(path.clone());
            }
        } else if path == "*" {
            violations.add(
                "update_mask",
                format!(
                    "path \"*\" (replace everything) is not supported; name the fields to change ({})",
                    UPDATABLE.join(", ")
                ),
            );
        } else if let Some((_, why)) = NOT_UPDATABLE.iter().find(|(field, _)| field == path) {
            violations.add(
                "update_mask",
                format!("path \"{path}\" is not updatable: it {why}"),
            );
        } else {
            violations.add(
                "update_mask",
                format!(
                    "path \"{}\" is not a field of Instance; updatable: {}",
                    path.chars().take(64).collect::<String>(),
                    UPDATABLE.join(", ")
                ),
            );
        }
    }
    accepted.sort();
    accepted
}

/// The spec's fields as a create request would carry them.
fn input_of(spec: &InstanceSpec) -> SpecInput {
    SpecInput {
        environment: Some(spec.environment),
        organization_name: spec.organization_name.clone(),
        contact_email: spec.contact_email.clone(),
        tier: Some(spec.tier),
        desired_count: i64::from(spec.desired_count),
        cpu: i64::from(spec.cpu),
        memory_mib: i64::from(spec.memory_mib),
        wordpress_image: spec.wordpress_image.clone(),
        wordpress_version: spec.wordpress_version.clone(),
        labels: spec.labels.clone(),
        opportunity_id: spec.opportunity_id.clone(),
        cost_center: spec.cost_center.clone(),
        custom_domains: spec.custom_domains.clone(),
    }
}

/// `current` with the masked fields taken from `request`.
fn masked(current: &InstanceSpec, request: &v1::Instance, paths: &[String]) -> SpecInput {
    let mut input = input_of(current);
    for path in paths {
        match path.as_str() {
            "wordpress_image" => input.wordpress_image = request.wordpress_image.clone(),
            "wordpress_version" => input.wordpress_version = request.wordpress_version.clone(),
            "cpu" => input.cpu = i64::from(request.cpu),
            "memory_mib" => input.memory_mib = i64::from(request.memory_mib),
            "desired_count" => input.desired_count = i64::from(request.desired_count),
            "labels" => input.labels = request.labels.clone(),
            "organization_name" => input.organization_name = request.organization_name.clone(),
            "contact_email" => input.contact_email = request.contact_email.clone(),
            "custom_domains" => input.custom_domains = request.custom_domains.clone(),
            _ => {}
        }
    }
    input
}

/// What kind of change a new spec is.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Nothing,
    /// Labels, organisation name or contact only.
    Record,
    /// Count and/or size only.
    Scale,
    /// A new image or tag (with or without anything else).
    Rollout,
    /// Custom domains added or removed, with record fields perhaps, and nothing to roll out:
    /// an update (`Verb::Update`) of the domains' certificates, listener and rules only.
    Domains,
}

fn classify(old: &InstanceSpec, new: &InstanceSpec) -> Change {
    let image = (&old.wordpress_image, &old.wordpress_version)
        != (&new.wordpress_image, &new.wordpress_version);
    let size = (old.desired_count, old.cpu, old.memory_mib)
        != (new.desired_count, new.cpu, new.memory_mib);
    let record = (&old.labels, &old.organization_name, &old.contact_email)
        != (&new.labels, &new.organization_name, &new.contact_email);
    let domains = old.custom_domains != new.custom_domains;
    match (image, size, record) {
        (true, _, _) => Change::Rollout,
        // New domains with a new count or size: one update that does both.
        (false, true, _) if domains => Change::Rollout,
        (false, false, _) if domains => Change::Domains,
        // The contract: SCALING when only the count or size changes.
        (false, true, false) => Change::Scale,
        // A new size with new labels: one rolling operation that records both.
        (false, true, true) => Change::Rollout,
        (false, false, true) => Change::Record,
        (false, false, false) => Change::Nothing,
    }
}

impl Api {
    pub async fn update_instance(
        &self,
        request: v1::UpdateInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let request_id = optional_request_id(&mut violations, &request.request_id);
        let paths = check_mask(request.update_mask.as_ref(), &mut violations);
        let name = match &request.instance {
            None => {
                violations.add("instance", "is required");
                None
            }
            Some(instance) => {
                violations.check("instance.name", InstanceName::parse(&instance.name))
            }
        };
        let (Some(name), Some(instance)) = (name, request.instance.as_ref()) else {
            return Err(ApiError::Invalid(violations));
        };
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations));
        }
        // The request as the mask sees it: unmasked fields do not count.
        let values: Vec<(String, String)> = paths
            .iter()
            .map(|path| {
                let value = match path.as_str() {
                    "wordpress_image" => instance.wordpress_image.clone(),
                    "wordpress_version" => instance.wordpress_version.clone(),
                    "cpu" => instance.cpu.to_string(),
                    "memory_mib" => instance.memory_mib.to_string(),
                    "desired_count" => instance.desired_count.to_string(),
                    "labels" => serde_json::to_string(&instance.labels).unwrap_or_default(),
                    "organization_name" => instance.organization_name.clone(),
                    "custom_domains" => {
                        serde_json::to_string(&instance.custom_domains).unwrap_or_default()
                    }
                    _ => instance.contact_email.clone(),
                };
                (path.clone(), value)
            })
            .collect();
        let fingerprint = fingerprint(&("update", &name, &values, &instance.etag));
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.update_instance_once(name, instance, &paths, request_id.as_ref(), &fingerprint),
        )
        .await
    }

    async fn update_instance_once(
        &self,
        name: InstanceName,
        request: &v1::Instance,
        paths: &[String],
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let current = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        if !request.etag.is_empty() && request.etag != current.etag() {
            return Err(ApiError::Aborted {
                reason: reason::ETAG_MISMATCH,
                message: format!(
                    "etag {} does not match the current {}; read the instance again",
                    request.etag,
                    current.etag()
                ),
            });
        }
        let spec = InstanceSpec::parse_with_domains(
            masked(&current.spec, request, paths),
            self.settings.scale_bounds_for(current.spec.environment),
            &self.settings.domain_rules_for(current.spec.environment),
        )
        .map_err(|errors| {
            let mut violations = Violations::new();
            violations.extend_prefixed("instance", errors);
            ApiError::Invalid(violations)
        })?;
        // A new image or tag is a new deployment: it must come from an allowed repository
        // (also when only the tag changes, in case the list shrank since the create).
        let image_changes = paths
            .iter()
            .any(|path| path == "wordpress_image" || path == "wordpress_version");
        if image_changes && let Some(why) = self.settings.images.refusal(&spec.wordpress_image) {
            return Err(ApiError::invalid("instance.wordpress_image", why));
        }
        if self.is_busy(&current).await? {
            return Err(busy(&current));
        }
        if current.state != InstanceState::Active {
            return Err(wrong_state(
                &current,
                "only ACTIVE instances can be updated",
            ));
        }
        let mut change = classify(&current.spec, &spec);
        // The same domains again: resumes the wait for certificates still pending (or gives
        // failed ones another pass).
        if change == Change::Nothing
            && paths.iter().any(|path| path == "custom_domains")
            && current
                .custom_domain_statuses
                .iter()
                .any(|status| status.state != crate::domain::DomainState::Active)
        {
            change = Change::Domains;
        }
        if change == Change::Nothing {
            return Err(ApiError::invalid(
                "update_mask",
                "nothing to change: the instance already has these values",
            ));
        }
        if change == Change::Record {
            return self
                .update_record(current, spec, request_id, fingerprint)
                .await;
        }
        self.check_environment(current.spec.environment)?;
        let timeout = Some(self.settings.rollout_timeout);
        let previous = rollout::Previous::of(&current);
        let (verb, mut params, message) = if change == Change::Scale {
            let target = rollout::Size {
                desired_count: spec.desired_count,
                cpu: spec.cpu,
                memory_mib: spec.memory_mib,
            };
            (
                Verb::Scale,
                scale::params(target, &previous, timeout),
                "scale requested (UpdateInstance)",
            )
        } else {
            let mut params = update::params(&spec, &previous, timeout);
            if change == Change::Domains {
                // Nothing to roll out: the update's steps are the domains' only.
                params["rollout"] = serde_json::json!(false);
            }
            (Verb::Update, params, "update requested")
        };
        params["from_state"] = serde_json::json!(current.state);
        params["previous_domains"] = serde_json::json!(current.spec.custom_domains);
        // The domains this update adds are claimed in its own transaction: a domain another
        // instance holds is ALREADY_EXISTS now, not a failed operation later.
        let added: Vec<String> = spec
            .custom_domains
            .iter()
            .filter(|domain| !current.spec.custom_domains.contains(domain))
            .cloned()
            .collect();
        let claims = self.domain_claims(&added, &name).await?;
        params["update_mask"] = serde_json::json!(paths);
        let workflow = crate::workflow::workflow_for(verb)
            .ok_or(ApiError::NotImplemented { rpc: "this verb" })?;
        let now = Timestamp::now();
        let mut operation = super::new_operation(verb, name, Vec::new(), request_id.cloned(), now);
        operation.params = params;
        let event = operation.next_event(now, None, message);
        self.start_operation(
            current,
            workflow.running_state(),
            operation,
            event,
            request_id,
            fingerprint,
            now,
            claims,
        )
        .await
    }

    /// A record-only change: written with an operation that is already COMPLETED, in one
    /// transaction conditional on the instance's version.
    async fn update_record(
        &self,
        mut instance: Instance,
        spec: InstanceSpec,
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let now = Timestamp::now();
        let mut operation = super::new_operation(
            Verb::Update,
            instance.name.clone(),
            Vec::new(),
            request_id.cloned(),
            now,
        );
        operation.params = serde_json::json!({ "from_state": instance.state, "record_only": true });
        operation.status = OperationStatus::Completed;
        operation.ended_at = Some(now);
        let accepted = operation.next_event(now, None, "update requested");
        let done = operation.next_event(
            now,
            None,
            "updated the record (labels, organisation, contact); nothing in AWS changes",
        );
        instance.spec = spec;
        instance.updated_at = now;
        let mut writes = vec![
            Write::UpdateInstance(instance.clone()),
            Write::CreateOperation(operation.clone()),
            Write::AppendEvent(accepted),
            Write::AppendEvent(done),
        ];
        writes.extend(self.request_write(request_id, fingerprint, &operation, now));
        let answer = self
            .commit_new_operation(writes, request_id, fingerprint, operation.clone())
            .await?;
        if answer.name != operation.id.name() {
            // Another request with this request_id won: its answer.
            return Ok(answer);
        }
        // Done at once: the response is the instance as written (the store bumped its
        // version).
        operation.version = 1;
        instance.version += 1;
        Ok(convert::operation_to_proto(&operation, Some(&instance)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(paths: &[&str]) -> prost_types::FieldMask {
        prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn the_mask_names_what_is_wrong() {
        let mut violations = Violations::new();
        let paths = check_mask(
            Some(&mask(&["labels", "tier", "colour", "*", "labels"])),
            &mut violations,
        );
        assert_eq!(paths, vec!["labels".to_owned()]);
        let text: Vec<String> = violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text[0].contains("\"tier\" is not updatable"), "{text:?}");
        assert!(text[1].contains("\"colour\" is not a field"), "{text:?}");
        assert!(text[2].contains("\"*\""), "{text:?}");
        let mut violations = Violations::new();
        assert!(check_mask(None, &mut violations).is_empty());
        assert_eq!(violations.iter().count(), 1);
    }

    #[test]
    fn changes_are_classified() {
        let old = InstanceSpec::parse(
            SpecInput {
                environment: Some(crate::domain::Environment::Dev),
                organization_name: "Acme".into(),
                contact_email: "ops@acme.example".into(),
                ..SpecInput::default()
            },
            crate::domain::ScaleBounds::default(),
        )
        .unwrap();
        let with = |edit: &dyn Fn(&mut InstanceSpec)| {
            let mut new = old.clone();
            edit(&mut new);
            classify(&old, &new)
        };
        assert_eq!(with(&|_| {}), Change::Nothing);
        assert_eq!(
            with(&|s| {
                s.labels.insert("team".into(), "web".into());
            }),
            Change::Record
        );
        assert_eq!(
            with(&|s| s.contact_email = "x@y.example".into()),
            Change::Record
        );
        assert_eq!(with(&|s| s.desired_count = 4), Change::Scale);
        assert_eq!(
            with(&|s| s.wordpress_version = "6.8".into()),
            Change::Rollout
        );
        assert_eq!(
            with(&|s| {
                s.cpu = 1024;
                s.organization_name = "Acme Ltd".into();
            }),
            Change::Rollout
        );
    }
}
