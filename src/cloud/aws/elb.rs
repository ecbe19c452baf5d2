//! Tenant target groups and host-header rules on an environment's shared ALB listener, and
//! the listener's SNI certificates (custom domains).
//!
//! AddListenerCertificates is idempotent in AWS, RemoveListenerCertificates of a certificate
//! not on the listener succeeds, and DescribeListenerCertificates lists the listener's
//! default certificate too (`IsDefault`). The listener's certificate and rule quotas
//! (`TooManyCertificates`, `TooManyRules`) are fatal here: placement keeps below them, and
//! this is the safety net.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate, FixedResponseActionConfig, HostHeaderConditionConfig,
    Matcher, ProtocolEnum, Rule, RuleCondition, Tag, TargetGroup, TargetGroupAttribute,
    TargetTypeEnum,
};

use super::{gone_is_ok, has_all_tags};
use crate::cloud::error::classify;
use crate::cloud::{
    CloudError, CloudResult, ErrorKind, FIXED_RESPONSE_BODY_MAX, HOSTS_PER_RULE, HostRuleSpec,
    Routing, RuleAction, TaggedResource, Tags, TargetGroupSpec, TargetHealth, not_ours, owner_tags,
};

/// DescribeTags accepts at most 20 resource ARNs per call.
const DESCRIBE_TAGS_BATCH: usize = 20;

pub struct AwsRouting {
    client: Client,
}

impl AwsRouting {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_elasticloadbalancingv2, sdk),
        }
    }

    async fn target_group_by_name(&self, name: &str) -> CloudResult<Option<String>> {
        let answer = self
            .client
            .describe_target_groups()
            .names(name)
            .send()
            .await;
        match answer.map_err(|e| classify("elbv2:DescribeTargetGroups", &e)) {
            Ok(out) => Ok(out
                .target_groups()
                .first()
                .and_then(TargetGroup::target_group_arn)
                .map(str::to_owned)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn create_target_group(&self, spec: &TargetGroupSpec) -> CloudResult<String> {
        let created = self
            .client
            .create_target_group()
            .name(&spec.name)
            .protocol(ProtocolEnum::Http)
            .port(80)
            .vpc_id(&spec.vpc_id)
            .target_type(TargetTypeEnum::Ip)
            .health_check_protocol(ProtocolEnum::Http)
            .health_check_path(&spec.health_check_path)
            .matcher(Matcher::builder().http_code(&spec.matcher).build())
            .set_tags(Some(to_tags(&spec.tags)))
            .send()
            .await
            .map_err(|e| classify("elbv2:CreateTargetGroup", &e))?;
        created
            .target_groups()
            .first()
            .and_then(TargetGroup::target_group_arn)
            .map(str::to_owned)
            .ok_or_else(|| {
                CloudError::fatal("elbv2:CreateTargetGroup: no target group in the answer")
            })
    }

    async fn rules(&self, listener_arn: &str) -> CloudResult<Vec<Rule>> {
        self.client
            .describe_rules()
            .listener_arn(listener_arn)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("elbv2:DescribeRules", &e))
    }

    async fn create_rule(&self, spec: &HostRuleSpec) -> CloudResult<String> {
        let priority = i32::try_from(spec.priority).map_err(|_| {
            CloudError::fatal(format!(
                "elbv2:CreateRule: priority {} is out of range",
                spec.priority
            ))
        })?;
        let condition = host_condition(&spec.hosts);
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(&spec.target_group_arn)
            .build();
        let created = self
            .client
            .create_rule()
            .listener_arn(&spec.listener_arn)
            .priority(priority)
            .conditions(condition)
            .actions(forward)
            .set_tags(Some(to_tags(&spec.tags)))
            .send()
            .await
            .map_err(|e| name_quota(classify("elbv2:CreateRule", &e)))?;
        created
            .rules()
            .first()
            .and_then(Rule::rule_arn)
            .map(str::to_owned)
            .ok_or_else(|| CloudError::fatal("elbv2:CreateRule: no rule in the answer"))
    }

    /// (ARN, every tag) of each of `arns` carrying every tag in `tags`.
    async fn tags_of(&self, arns: Vec<String>, tags: &Tags) -> CloudResult<Vec<(String, Tags)>> {
        let mut matching = Vec::new();
        for batch in arns.chunks(DESCRIBE_TAGS_BATCH) {
            let answer = self
                .client
                .describe_tags()
                .set_resource_arns(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| classify("elbv2:DescribeTags", &e))?;
            for description in answer.tag_descriptions() {
                let pairs = description
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value()?)));
                if has_all_tags(pairs.clone(), tags)
                    && let Some(arn) = description.resource_arn()
                {
                    let all = pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                    matching.push((arn.to_owned(), all));
                }
            }
        }
        Ok(matching)
    }

    /// The rule, `None` if it does not exist.
    async fn rule(&self, rule_arn: &str) -> CloudResult<Option<Rule>> {
        let answer = self
            .client
            .describe_rules()
            .rule_arns(rule_arn)
            .send()
            .await
            .map_err(|e| classify("elbv2:DescribeRules", &e));
        match answer {
            Ok(out) => Ok(out
                .rules()
                .iter()
                .find(|rule| rule.rule_arn() == Some(rule_arn))
                .cloned()),
            // RuleNotFound
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Every certificate of the listener, the default one (`IsDefault`) too.
    async fn all_listener_certificates(&self, listener_arn: &str) -> CloudResult<Vec<Certificate>> {
        self.client
            .describe_listener_certificates()
            .listener_arn(listener_arn)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("elbv2:DescribeListenerCertificates", &e))
    }

    async fn filter_tagged(&self, arns: Vec<String>, tags: &Tags) -> CloudResult<Vec<String>> {
        let matching = self.tags_of(arns, tags).await?;
        Ok(matching.into_iter().map(|(arn, _)| arn).collect())
    }
}

fn to_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn host_condition(hosts: &[String]) -> RuleCondition {
    RuleCondition::builder()
        .field("host-header")
        .host_header_config(
            HostHeaderConditionConfig::builder()
                .set_values(Some(hosts.to_vec()))
                .build(),
        )
        .build()
}

/// A rule's host list must fit one host-header condition.
fn check_hosts(what: &str, hosts: &[String]) -> CloudResult<()> {
    if hosts.is_empty() || hosts.len() > HOSTS_PER_RULE {
        return Err(CloudError::fatal(format!(
            "{what}: a rule takes 1 to {HOSTS_PER_RULE} hosts, not {}",
            hosts.len()
        )));
    }
    Ok(())
}

/// The values of the rule's host-header condition (DescribeRules reports them in
/// `HostHeaderConfig`, older rules in `Values`), `None` if it has none.
fn rule_host_values(rule: &Rule) -> Option<Vec<String>> {
    let condition = rule
        .conditions()
        .iter()
        .find(|condition| condition.field() == Some("host-header"))?;
    let values = match condition.host_header_config() {
        Some(config) if !config.values().is_empty() => config.values(),
        _ => condition.values(),
    };
    Some(values.to_vec())
}

/// Is this rule's only condition a host-header one including `host` (host names are
/// case-insensitive)?
fn routes_host(rule: &Rule, host: &str) -> bool {
    rule.conditions().len() == 1
        && rule_host_values(rule)
            .is_some_and(|hosts| hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
}

/// The quota errors ELB answers with, named: what the load balancer ran out of.
const QUOTAS: &[(&str, &str)] = &[
    (
        "TooManyCertificates",
        "the listener's certificate quota (certificates per Application Load Balancer, 25 \
         by default besides the default certificate) is reached",
    ),
    (
        "TooManyRules",
        "the load balancer's rule quota (rules per Application Load Balancer, 100 by default \
         besides the default rules) is reached",
    ),
    (
        "TooManyConditionValues",
        "a rule takes at most 5 condition values (match evaluations)",
    ),
];

/// A quota error is fatal, with the quota named; other errors pass unchanged.
fn name_quota(error: CloudError) -> CloudError {
    for (code, quota) in QUOTAS {
        if error.message.contains(&format!(": {code}:")) {
            return CloudError::fatal(format!("{}: {quota}", error.message));
        }
    }
    error
}

fn forwards_to(rule: &Rule, target_group_arn: &str) -> bool {
    rule.actions().iter().any(|action| {
        action.target_group_arn() == Some(target_group_arn)
            || action.forward_config().is_some_and(|forward| {
                forward
                    .target_groups()
                    .iter()
                    .any(|tuple| tuple.target_group_arn() == Some(target_group_arn))
            })
    })
}

/// The final action of a rule: the one with the highest `Order` (authenticate actions come
/// first; the last one forwards, redirects or answers), or the last listed.
fn final_action(rule: &Rule) -> Option<RuleAction> {
    let action = rule
        .actions()
        .iter()
        .enumerate()
        .max_by_key(|(index, action)| (action.order().unwrap_or(i32::MAX), *index))
        .map(|(_, action)| action)?;
    Some(to_rule_action(action))
}

fn to_rule_action(action: &Action) -> RuleAction {
    let kind = action
        .r#type()
        .map(|t| t.as_str().to_owned())
        .unwrap_or_default();
    match action.r#type() {
        Some(ActionTypeEnum::Forward) => {
            // DescribeRules reports a forward to one group both as TargetGroupArn and as a
            // ForwardConfig with that one group; several groups is a weighted forward.
            let groups: Vec<&str> = match action.forward_config() {
                Some(forward) if !forward.target_groups().is_empty() => forward
                    .target_groups()
                    .iter()
                    .filter_map(|tuple| tuple.target_group_arn())
                    .collect(),
                _ => action.target_group_arn().into_iter().collect(),
            };
            match groups.as_slice() {
                [only] => RuleAction::Forward {
                    target_group_arn: (*only).to_owned(),
                },
                _ => RuleAction::Other {
                    kind: format!("forward to {} target groups", groups.len()),
                },
            }
        }
        Some(ActionTypeEnum::FixedResponse) => {
            let config = action.fixed_response_config();
            let status = config.and_then(|c| c.status_code()).unwrap_or_default();
            match status.parse() {
                Ok(status_code) => RuleAction::FixedResponse {
                    status_code,
                    content_type: config
                        .and_then(|c| c.content_type())
                        .unwrap_or_default()
                        .to_owned(),
                    body: config
                        .and_then(|c| c.message_body())
                        .unwrap_or_default()
                        .to_owned(),
                },
                Err(_) => RuleAction::Other {
                    kind: format!("fixed-response with status {status:?}"),
                },
            }
        }
        _ => RuleAction::Other { kind },
    }
}

/// The ELBv2 action for `action`, checked against the API's constraints first (a refused
/// ModifyRule would only say so after the call).
fn to_sdk_action(action: &RuleAction) -> CloudResult<Action> {
    match action {
        RuleAction::Forward { target_group_arn } => Ok(Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(target_group_arn)
            .build()),
        RuleAction::FixedResponse {
            status_code,
            content_type,
            body,
        } => {
            if !matches!(status_code / 100, 2 | 4 | 5) || *status_code > 599 {
                return Err(CloudError::fatal(format!(
                    "elbv2:ModifyRule: a fixed response needs a 2XX, 4XX or 5XX status, not {status_code}"
                )));
            }
            if body.chars().count() > FIXED_RESPONSE_BODY_MAX {
                return Err(CloudError::fatal(format!(
                    "elbv2:ModifyRule: a fixed-response body holds at most {FIXED_RESPONSE_BODY_MAX} characters"
                )));
            }
            let config = FixedResponseActionConfig::builder()
                .status_code(status_code.to_string())
                .content_type(content_type)
                .message_body(body)
                .build();
            Ok(Action::builder()
                .r#type(ActionTypeEnum::FixedResponse)
                .fixed_response_config(config)
                .build())
        }
        RuleAction::Other { kind } => Err(CloudError::fatal(format!(
            "elbv2:ModifyRule: cannot set a rule's action to {kind}"
        ))),
    }
}

#[async_trait]
impl Routing for AwsRouting {
    async fn ensure_target_group(&self, spec: &TargetGroupSpec) -> CloudResult<String> {
        let arn = match self.target_group_by_name(&spec.name).await? {
            Some(arn) => arn,
            None => match self.create_target_group(spec).await {
                // DuplicateTargetGroupName: created concurrently by another replica.
                Err(error) if error.kind == ErrorKind::Conflict => {
                    self.target_group_by_name(&spec.name).await?.ok_or(error)?
                }
                other => other?,
            },
        };
        // Found by name: adopted only if this instance owns it (see `owned_by`).
        let owner = owner_tags(&spec.tags);
        let claims = owner.iter().any(|(key, _)| key.ends_with(":instance-id"));
        if claims
            && self
                .filter_tagged(vec![arn.clone()], &owner)
                .await?
                .is_empty()
        {
            return Err(not_ours(&format!("target group {}", spec.name)));
        }
        if let Some(delay) = spec.deregistration_delay_secs {
            self.client
                .modify_target_group_attributes()
                .target_group_arn(&arn)
                .attributes(
                    TargetGroupAttribute::builder()
                        .key("deregistration_delay.timeout_seconds")
                        .value(delay.to_string())
                        .build(),
                )
                .send()
                .await
                .map_err(|e| classify("elbv2:ModifyTargetGroupAttributes", &e))?;
        }
        Ok(arn)
    }

    async fn delete_target_group(&self, arn: &str) -> CloudResult<()> {
        let result = self
            .client
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("elbv2:DeleteTargetGroup", &e));
        gone_is_ok(result)
    }

    async fn rule_priorities(&self, listener_arn: &str) -> CloudResult<Vec<u32>> {
        // The default rule's priority is the word `default`; it holds no number.
        Ok(self
            .rules(listener_arn)
            .await?
            .iter()
            .filter(|rule| rule.is_default() != Some(true))
            .filter_map(|rule| rule.priority()?.parse().ok())
            .collect())
    }

    async fn ensure_host_rule(&self, spec: &HostRuleSpec) -> CloudResult<String> {
        check_hosts("elbv2:CreateRule", &spec.hosts)?;
        let first = &spec.hosts[0];
        let rules = self.rules(&spec.listener_arn).await?;
        if let Some(rule) = rules.iter().find(|rule| routes_host(rule, first)) {
            let arn = rule.rule_arn().unwrap_or_default();
            let owner = owner_tags(&spec.tags);
            let claims = owner.iter().any(|(key, _)| key.ends_with(":instance-id"));
            let owned = !claims
                || !self
                    .filter_tagged(vec![arn.to_owned()], &owner)
                    .await?
                    .is_empty();
            if owned && forwards_to(rule, &spec.target_group_arn) {
                return Ok(arn.to_owned());
            }
            // Someone else routes this host: a second rule would be shadowed or shadow it,
            // and taking theirs over could break a site. An operator has to decide.
            return Err(CloudError::fatal(format!(
                "elbv2:CreateRule: host {first} is already routed elsewhere by rule {arn}"
            )));
        }
        self.create_rule(spec).await
    }

    async fn delete_rule(&self, rule_arn: &str) -> CloudResult<()> {
        let result = self
            .client
            .delete_rule()
            .rule_arn(rule_arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("elbv2:DeleteRule", &e));
        gone_is_ok(result)
    }

    async fn rule_action(&self, rule_arn: &str) -> CloudResult<Option<RuleAction>> {
        Ok(self.rule(rule_arn).await?.as_ref().and_then(final_action))
    }

    async fn set_rule_action(&self, rule_arn: &str, action: &RuleAction) -> CloudResult<()> {
        let action = to_sdk_action(action)?;
        self.client
            .modify_rule()
            .rule_arn(rule_arn)
            .actions(action)
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("elbv2:ModifyRule", &e))
    }

    async fn target_health(&self, target_group_arn: &str) -> CloudResult<Vec<(String, String)>> {
        let answer = self
            .client
            .describe_target_health()
            .target_group_arn(target_group_arn)
            .send()
            .await
            .map_err(|e| classify("elbv2:DescribeTargetHealth", &e))?;
        Ok(answer
            .target_health_descriptions()
            .iter()
            .filter_map(|description| {
                let id = description.target()?.id()?;
                let state = description.target_health()?.state()?;
                Some((id.to_owned(), state.as_str().to_owned()))
            })
            .collect())
    }

    async fn target_health_details(
        &self,
        target_group_arn: &str,
    ) -> CloudResult<Vec<TargetHealth>> {
        let answer = self
            .client
            .describe_target_health()
            .target_group_arn(target_group_arn)
            .send()
            .await
            .map_err(|e| classify("elbv2:DescribeTargetHealth", &e))?;
        Ok(answer
            .target_health_descriptions()
            .iter()
            .filter_map(|description| {
                let target = description.target()?;
                let health = description.target_health();
                Some(TargetHealth {
                    id: target.id()?.to_owned(),
                    port: target.port().and_then(|port| u16::try_from(port).ok()),
                    state: health
                        .and_then(|h| h.state())
                        .map(|state| state.as_str().to_owned())
                        .unwrap_or_default(),
                    reason: health
                        .and_then(|h| h.reason())
                        .map(|reason| reason.as_str().to_owned()),
                    description: health.and_then(|h| h.description()).map(str::to_owned),
                })
            })
            .collect())
    }

    async fn find_tagged(&self, listener_arn: &str, tags: &Tags) -> CloudResult<Vec<String>> {
        let target_groups: Vec<TargetGroup> = self
            .client
            .describe_target_groups()
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("elbv2:DescribeTargetGroups", &e))?;
        let rules = self.rules(listener_arn).await?;
        let arns = target_groups
            .iter()
            .filter_map(|tg| tg.target_group_arn())
            .chain(
                rules
                    .iter()
                    .filter(|rule| rule.is_default() != Some(true))
                    .filter_map(|rule| rule.rule_arn()),
            )
            .map(str::to_owned)
            .collect();
        self.filter_tagged(arns, tags).await
    }

    async fn tagged_routing(
        &self,
        listener_arn: &str,
        tags: &Tags,
    ) -> CloudResult<Vec<TaggedResource>> {
        let target_groups: Vec<String> = self
            .client
            .describe_target_groups()
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify("elbv2:DescribeTargetGroups", &e))?
            .iter()
            .filter_map(|tg| tg.target_group_arn().map(str::to_owned))
            .collect();
        let rules: Vec<String> = self
            .rules(listener_arn)
            .await?
            .iter()
            .filter(|rule| rule.is_default() != Some(true))
            .filter_map(|rule| rule.rule_arn().map(str::to_owned))
            .collect();
        let mut found = Vec::new();
        for (kind, arns) in [("target_group", target_groups), ("listener_rule", rules)] {
            for (id, tags) in self.tags_of(arns, tags).await? {
                found.push(TaggedResource {
                    kind,
                    id,
                    tags,
                    // DescribeTargetGroups and DescribeRules tell no creation time.
                    created_at: None,
                });
            }
        }
        Ok(found)
    }

    async fn add_listener_certificate(
        &self,
        listener_arn: &str,
        certificate_arn: &str,
    ) -> CloudResult<()> {
        // AWS answers a repeated add with success; reading first also keeps a list that an
        // emulator would let grow with duplicates clean.
        if self
            .all_listener_certificates(listener_arn)
            .await?
            .iter()
            .any(|c| c.certificate_arn() == Some(certificate_arn))
        {
            return Ok(());
        }
        self.client
            .add_listener_certificates()
            .listener_arn(listener_arn)
            .certificates(
                Certificate::builder()
                    .certificate_arn(certificate_arn)
                    .build(),
            )
            .send()
            .await
            .map(drop)
            .map_err(|e| name_quota(classify("elbv2:AddListenerCertificates", &e)))
    }

    async fn remove_listener_certificate(
        &self,
        listener_arn: &str,
        certificate_arn: &str,
    ) -> CloudResult<()> {
        let result = self
            .client
            .remove_listener_certificates()
            .listener_arn(listener_arn)
            .certificates(
                Certificate::builder()
                    .certificate_arn(certificate_arn)
                    .build(),
            )
            .send()
            .await
            .map(drop)
            .map_err(|e| classify("elbv2:RemoveListenerCertificates", &e));
        // ListenerNotFound, CertificateNotFound: it is not there.
        gone_is_ok(result)
    }

    async fn listener_certificates(&self, listener_arn: &str) -> CloudResult<Vec<String>> {
        Ok(self
            .all_listener_certificates(listener_arn)
            .await?
            .iter()
            .filter(|c| c.is_default() != Some(true))
            .filter_map(|c| c.certificate_arn().map(str::to_owned))
            .collect())
    }

    async fn rule_hosts(&self, rule_arn: &str) -> CloudResult<Option<Vec<String>>> {
        Ok(self
            .rule(rule_arn)
            .await?
            .map(|rule| rule_host_values(&rule).unwrap_or_default()))
    }

    async fn set_rule_hosts(&self, rule_arn: &str, hosts: &[String]) -> CloudResult<()> {
        check_hosts("elbv2:ModifyRule", hosts)?;
        // ModifyRule replaces every condition: a rule that has others is not one of ours.
        let rule = self.rule(rule_arn).await?.ok_or_else(|| {
            CloudError::new(
                ErrorKind::NotFound,
                format!("elbv2:ModifyRule: rule {rule_arn} does not exist"),
            )
        })?;
        if rule
            .conditions()
            .iter()
            .any(|condition| condition.field() != Some("host-header"))
        {
            return Err(CloudError::fatal(format!(
                "elbv2:ModifyRule: rule {rule_arn} has conditions besides its host-header; \
                 not replacing them"
            )));
        }
        self.client
            .modify_rule()
            .rule_arn(rule_arn)
            .conditions(host_condition(hosts))
            .send()
            .await
            .map(drop)
            .map_err(|e| name_quota(classify("elbv2:ModifyRule", &e)))
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_elasticloadbalancingv2::types::{ForwardActionConfig, TargetGroupTuple};

    use super::*;

    fn tuple(arn: &str) -> TargetGroupTuple {
        TargetGroupTuple::builder().target_group_arn(arn).build()
    }

    fn host_rule(values: &[&str], legacy: bool) -> Rule {
        let condition = RuleCondition::builder().field("host-header");
        let condition = if legacy {
            condition.set_values(Some(values.iter().map(|v| v.to_string()).collect()))
        } else {
            condition.host_header_config(
                HostHeaderConditionConfig::builder()
                    .set_values(Some(values.iter().map(|v| v.to_string()).collect()))
                    .build(),
            )
        };
        Rule::builder().conditions(condition.build()).build()
    }

    #[test]
    fn rule_hosts_are_read_from_either_field() {
        for legacy in [false, true] {
            let rule = host_rule(&["a.example", "Shop.Example.com", "c.example"], legacy);
            assert_eq!(
                rule_host_values(&rule).unwrap(),
                vec!["a.example", "Shop.Example.com", "c.example"]
            );
            assert!(routes_host(&rule, "shop.example.com"));
            assert!(!routes_host(&rule, "d.example"));
        }
        assert_eq!(rule_host_values(&Rule::builder().build()), None);
    }

    #[test]
    fn a_rule_takes_one_to_three_hosts() {
        let hosts = |n: usize| (0..n).map(|i| format!("h{i}.example")).collect::<Vec<_>>();
        assert!(check_hosts("x", &hosts(0)).is_err());
        assert!(check_hosts("x", &hosts(1)).is_ok());
        assert!(check_hosts("x", &hosts(HOSTS_PER_RULE)).is_ok());
        assert!(check_hosts("x", &hosts(HOSTS_PER_RULE + 1)).is_err());
    }

    #[test]
    fn quota_errors_are_fatal_and_name_the_quota() {
        let certificates = name_quota(CloudError::fatal(
            "elbv2:AddListenerCertificates: TooManyCertificates: You've reached the limit",
        ));
        assert_eq!(certificates.kind, ErrorKind::Fatal);
        assert!(certificates.message.contains("certificate quota"));
        let rules = name_quota(CloudError::new(
            ErrorKind::Fatal,
            "elbv2:CreateRule: TooManyRules: too many",
        ));
        assert!(rules.message.contains("rule quota"));
        let other = CloudError::new(ErrorKind::Conflict, "elbv2:CreateRule: PriorityInUse: x");
        assert_eq!(name_quota(other.clone()), other);
    }

    #[test]
    fn a_described_forward_is_read_from_either_field() {
        // DescribeRules reports a single-group forward both ways; older rules only one.
        let both = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn("tg-1")
            .forward_config(
                ForwardActionConfig::builder()
                    .target_groups(tuple("tg-1"))
                    .build(),
            )
            .build();
        let arn_only = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn("tg-1")
            .build();
        for action in [both, arn_only] {
            assert_eq!(
                to_rule_action(&action),
                RuleAction::Forward {
                    target_group_arn: "tg-1".into()
                }
            );
        }
        let weighted = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .forward_config(
                ForwardActionConfig::builder()
                    .target_groups(tuple("tg-1"))
                    .target_groups(tuple("tg-2"))
                    .build(),
            )
            .build();
        assert!(matches!(
            to_rule_action(&weighted),
            RuleAction::Other { .. }
        ));
    }

    #[test]
    fn the_final_action_follows_authentication() {
        let page = suspended();
        let rule = Rule::builder()
            .actions(
                Action::builder()
                    .r#type(ActionTypeEnum::AuthenticateCognito)
                    .order(1)
                    .build(),
            )
            .actions(
                Action::builder()
                    .r#type(ActionTypeEnum::FixedResponse)
                    .order(2)
                    .fixed_response_config(
                        FixedResponseActionConfig::builder()
                            .status_code("503")
                            .content_type("text/html")
                            .message_body("<h1>suspended</h1>")
                            .build(),
                    )
                    .build(),
            )
            .build();
        assert_eq!(final_action(&rule), Some(page));
        assert_eq!(final_action(&Rule::builder().build()), None);
    }

    fn suspended() -> RuleAction {
        RuleAction::FixedResponse {
            status_code: 503,
            content_type: "text/html".into(),
            body: "<h1>suspended</h1>".into(),
        }
    }

    #[test]
    fn fixed_responses_outside_the_api_constraints_are_refused_before_the_call() {
        let sdk = to_sdk_action(&suspended()).unwrap();
        let config = sdk.fixed_response_config().unwrap();
        assert_eq!(config.status_code(), Some("503"));
        assert_eq!(config.content_type(), Some("text/html"));
        assert_eq!(to_rule_action(&sdk), suspended());
        for status_code in [302, 100, 600, 0] {
            let action = RuleAction::FixedResponse {
                status_code,
                content_type: "text/plain".into(),
                body: String::new(),
            };
            assert!(to_sdk_action(&action).is_err(), "{status_code}");
        }
        let long = |n: usize| RuleAction::FixedResponse {
            status_code: 503,
            content_type: "text/plain".into(),
            body: "é".repeat(n),
        };
        // Characters, not bytes: 1024 two-byte characters fit.
        assert!(to_sdk_action(&long(FIXED_RESPONSE_BODY_MAX)).is_ok());
        assert!(to_sdk_action(&long(FIXED_RESPONSE_BODY_MAX + 1)).is_err());
        assert!(
            to_sdk_action(&RuleAction::Other {
                kind: "redirect".into()
            })
            .is_err()
        );
    }
}
