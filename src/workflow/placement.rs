//! Placing instances on an environment's pool of load balancers, and keeping count of what
//! each listener holds.
//!
//! An ALB takes 100 rules, 100 target groups and 25 certificates by default; past that,
//! CreateRule and friends fail. So every instance reserves what it uses — rules, one target
//! group, one certificate per custom domain — before anything is created, as *slots* in the
//! state store: slot `k` of kind `rule` on a listener is an item that exists only while some
//! instance holds it, written with a conditional put (the same mechanism as rule
//! priorities). Slots are numbered below the listener's quota, so however many replicas
//! reserve at once, a listener never holds more than its quota: two reservations of the same
//! slot cannot both succeed, and the loser reads again and takes another slot or another
//! listener. Releasing deletes the instance's own slots only.
//!
//! Provisioning's first step ([`LOAD_BALANCER`]) places the instance on the first member of
//! the pool (in configuration order) with room for all it needs, or fails the operation with
//! RESOURCE_EXHAUSTED (`LOAD_BALANCER_POOL_FULL`) before anything exists. The member's name
//! is recorded on the instance; it stays there for life (adding a member is a configuration
//! change and moves nobody).

use crate::cloud::{DEFAULT_LOAD_BALANCER, HOSTS_PER_RULE, LoadBalancer};
use crate::domain::operation::failure_reason;
use crate::store::{PriorityClaim, StoreError, Write};

use super::{StepCtx, StepError, StepResult};

/// Provisioning's first step: reserves room on a load balancer of the pool. Its output is
/// the member's name.
pub const LOAD_BALANCER: &str = "load_balancer";

/// Conditional writes that lose to another replica are retried this often before the step
/// backs off (transient) and tries again.
const ATTEMPTS: usize = 20;

/// What an instance takes of its load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub rules: u32,
    pub target_groups: u32,
    pub certificates: u32,
}

/// What an instance with `domains` custom domains takes: one rule per [`HOSTS_PER_RULE`]
/// host names (its platform host and each domain), one target group, one certificate per
/// domain.
pub fn need(domains: usize) -> Need {
    let hosts = 1 + domains;
    Need {
        rules: u32::try_from(hosts.div_ceil(HOSTS_PER_RULE)).unwrap_or(u32::MAX),
        target_groups: 1,
        certificates: u32::try_from(domains).unwrap_or(u32::MAX),
    }
}

/// The kinds of slot a listener has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rule,
    TargetGroup,
    Certificate,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Rule, Kind::TargetGroup, Kind::Certificate];

    fn as_str(self) -> &'static str {
        match self {
            Kind::Rule => "rule",
            Kind::TargetGroup => "target-group",
            Kind::Certificate => "certificate",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Rule => "rules",
            Kind::TargetGroup => "target groups",
            Kind::Certificate => "certificates",
        }
    }

    fn quota(self, lb: &LoadBalancer) -> u32 {
        match self {
            Kind::Rule => lb.rules_quota(),
            Kind::TargetGroup => lb.target_groups_quota(),
            Kind::Certificate => lb.certificates_quota(),
        }
    }

    fn wanted(self, need: Need) -> u32 {
        match self {
            Kind::Rule => need.rules,
            Kind::TargetGroup => need.target_groups,
            Kind::Certificate => need.certificates,
        }
    }
}

/// The store key under which a listener's slots of `kind` are kept (next to its rule
/// priorities, which are keyed by the bare ARN).
fn slot_key(listener_arn: &str, kind: Kind) -> String {
    format!("{listener_arn}#slot:{}", kind.as_str())
}

/// How many of each kind a listener holds, for messages and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub rules: u32,
    pub target_groups: u32,
    pub certificates: u32,
}

/// What the slots of `lb` say it holds (every instance's reservations).
pub async fn usage(store: &dyn crate::store::StateStore, lb: &LoadBalancer) -> StepResult<Usage> {
    let mut usage = Usage::default();
    for kind in Kind::ALL {
        let held = store
            .listener_priorities(&slot_key(&lb.listener_arn, kind))
            .await?
            .len();
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        match kind {
            Kind::Rule => usage.rules = held,
            Kind::TargetGroup => usage.target_groups = held,
            Kind::Certificate => usage.certificates = held,
        }
    }
    Ok(usage)
}

/// Runs provisioning's [`LOAD_BALANCER`] step: the member the instance already holds slots
/// on (a resumed step), else the first with room for [`need`] of its custom domains.
pub async fn place(ctx: &StepCtx) -> StepResult<String> {
    let pool = ctx.cloud.platform.pool();
    if pool.is_empty() {
        return Err(StepError::Fatal(
            "the environment's platform names no load balancer (load_balancers or listener_arn)"
                .into(),
        ));
    }
    let wanted = need(ctx.instance.spec.custom_domains.len());
    for lb in &pool {
        // A reservation always has a rule slot, claimed in the one transaction with the
        // others: the rule slots alone say where a resumed step placed the instance.
        if holds_kind(ctx, lb, Kind::Rule).await? {
            return match reserve_on(ctx, lb, wanted).await? {
                Ok(()) => Ok(lb.name.clone()),
                Err(short) => Err(full(failure_reason::LOAD_BALANCER_FULL, &lb.name, &short)),
            };
        }
    }
    let mut shortfalls = Vec::new();
    for lb in &pool {
        match reserve_on(ctx, lb, wanted).await? {
            Ok(()) => {
                tracing::info!(load_balancer = %lb.name, instance = %ctx.instance.name, "placed");
                return Ok(lb.name.clone());
            }
            Err(short) => shortfalls.push(format!("{}: {short}", lb.name)),
        }
    }
    Err(StepError::Refused {
        reason: failure_reason::LOAD_BALANCER_POOL_FULL,
        message: format!(
            "no load balancer of the {} pool has room for {} rule(s), {} target group(s) and \
             {} certificate(s): {}",
            ctx.cloud.environment,
            wanted.rules,
            wanted.target_groups,
            wanted.certificates,
            shortfalls.join("; ")
        ),
    })
}

fn full(reason: &'static str, name: &str, short: &str) -> StepError {
    StepError::Refused {
        reason,
        message: format!("load balancer {name} is full: {short}"),
    }
}

/// The pool member the instance is on: this operation's placement, else the one recorded
/// on the instance, else (an instance placed before pools) the member whose listener is
/// the platform's `listener_arn`, or that listener as the `default` member.
pub fn load_balancer_of(ctx: &StepCtx) -> StepResult<LoadBalancer> {
    let platform = &ctx.cloud.platform;
    let name = ctx
        .output(LOAD_BALANCER)
        .map(str::to_owned)
        .or_else(|| ctx.instance.load_balancer.as_ref().map(|p| p.name.clone()));
    match name {
        Some(name) => platform.load_balancer(&name).ok_or_else(|| {
            StepError::Fatal(format!(
                "the instance is on load balancer {name}, which the platform configuration \
                 no longer names (members must not be renamed or removed while in use)"
            ))
        }),
        None => Ok(platform
            .pool()
            .into_iter()
            .find(|lb| lb.listener_arn == platform.listener_arn)
            .unwrap_or_else(|| LoadBalancer {
                name: DEFAULT_LOAD_BALANCER.to_owned(),
                listener_arn: platform.listener_arn.clone(),
                ..LoadBalancer::default()
            })),
    }
}

/// Makes the instance's reservation on its load balancer exactly `need` (claims or gives
/// back rule and certificate slots). When the listener lacks room nothing changes and the
/// error is `Refused` with `LOAD_BALANCER_FULL`.
pub async fn reserve(ctx: &StepCtx, need: Need) -> StepResult<()> {
    let lb = load_balancer_of(ctx)?;
    reserve_on(ctx, &lb, need)
        .await?
        .map_err(|short| full(failure_reason::LOAD_BALANCER_FULL, &lb.name, &short))
}

/// Gives back every slot the instance holds on any member of the pool (rollback,
/// deprovisioning). Succeeds when it holds none.
pub async fn release(ctx: &StepCtx) -> StepResult<()> {
    for lb in ctx.cloud.platform.pool() {
        for kind in Kind::ALL {
            let key = slot_key(&lb.listener_arn, kind);
            let held = ctx.store.listener_priorities(&key).await?;
            for claim in held.into_iter().filter(|c| c.owner == ctx.instance.name) {
                match ctx.store.commit(vec![Write::ReleasePriority(claim)]).await {
                    // Conflict: already released (a repeat after a crash).
                    Ok(()) | Err(StoreError::Conflict { .. }) => {}
                    Err(other) => return Err(other.into()),
                }
            }
        }
    }
    Ok(())
}

/// Whether the instance holds a slot on any member of the pool.
pub async fn holds_any_slot(ctx: &StepCtx) -> StepResult<bool> {
    for lb in ctx.cloud.platform.pool() {
        if holds_any(ctx, &lb).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn holds_any(ctx: &StepCtx, lb: &LoadBalancer) -> StepResult<bool> {
    for kind in Kind::ALL {
        if holds_kind(ctx, lb, kind).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn holds_kind(ctx: &StepCtx, lb: &LoadBalancer, kind: Kind) -> StepResult<bool> {
    let held = ctx
        .store
        .listener_priorities(&slot_key(&lb.listener_arn, kind))
        .await?;
    Ok(held.iter().any(|c| c.owner == ctx.instance.name))
}

/// Rules on the listener that hold a priority but no rule slot: those of instances placed
/// before slots existed. They count against the listener's rules.
async fn unslotted_rules(
    ctx: &StepCtx,
    lb: &LoadBalancer,
    slotted: &[PriorityClaim],
) -> StepResult<u32> {
    let priorities = ctx.store.listener_priorities(&lb.listener_arn).await?;
    let count = priorities
        .iter()
        .filter(|p| !slotted.iter().any(|s| s.owner == p.owner))
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Where `owner` starts looking among free slots (or priorities) on its `attempt`-th try.
/// Placements that run at once would all choose the lowest free one and collide (one wins a
/// round, the rest read and try again: a burst of n costs ~n² reads); starting each from an
/// offset of its own spreads them, and a new attempt moves on.
pub(super) fn spread(owner: &crate::domain::InstanceName, attempt: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (owner, attempt).hash(&mut hasher);
    usize::try_from(hasher.finish() % (1 << 31)).unwrap_or(0)
}

/// One attempt loop of [`reserve`] on `lb`: `Ok(Err(shortfall))` when it has no room.
async fn reserve_on(
    ctx: &StepCtx,
    lb: &LoadBalancer,
    need: Need,
) -> StepResult<Result<(), String>> {
    let me = &ctx.instance.name;
    for attempt in 0..ATTEMPTS {
        let mut writes = Vec::new();
        for kind in Kind::ALL {
            let key = slot_key(&lb.listener_arn, kind);
            let held = ctx.store.listener_priorities(&key).await?;
            let mut quota = kind.quota(lb);
            if kind == Kind::Rule {
                quota = quota.saturating_sub(unslotted_rules(ctx, lb, &held).await?);
            }
            let mut mine: Vec<&PriorityClaim> = held.iter().filter(|c| &c.owner == me).collect();
            let wanted = kind.wanted(need) as usize;
            if mine.len() > wanted {
                mine.sort_by_key(|c| std::cmp::Reverse(c.priority));
                let extra = mine.len() - wanted;
                writes.extend(
                    mine.into_iter()
                        .take(extra)
                        .map(|c| Write::ReleasePriority(c.clone())),
                );
                continue;
            }
            let missing = wanted - mine.len();
            if missing == 0 {
                continue;
            }
            let free: Vec<u32> = (0..quota)
                .filter(|slot| !held.iter().any(|c| c.priority == *slot))
                .collect();
            if free.len() < missing {
                return Ok(Err(format!(
                    "{} of {} {} taken, {} more needed",
                    held.len(),
                    kind.quota(lb),
                    kind.plural(),
                    missing
                )));
            }
            let start = spread(me, attempt) % free.len();
            writes.extend(
                free.into_iter()
                    .cycle()
                    .skip(start)
                    .take(missing)
                    .map(|slot| {
                        Write::ClaimPriority(PriorityClaim {
                            listener_arn: key.clone(),
                            priority: slot,
                            owner: me.clone(),
                        })
                    }),
            );
        }
        if writes.is_empty() {
            return Ok(Ok(()));
        }
        match ctx.store.commit(writes).await {
            Ok(()) => return Ok(Ok(())),
            // Another replica took a slot we chose (or gave one back): read again.
            Err(StoreError::Conflict { .. } | StoreError::Contention) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(StepError::Transient(format!(
        "the slots of load balancer {} are contended",
        lb.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_hosts_share_a_rule() {
        assert_eq!(
            need(0),
            Need {
                rules: 1,
                target_groups: 1,
                certificates: 0
            }
        );
        assert_eq!(need(2).rules, 1);
        assert_eq!(need(3).rules, 2);
        assert_eq!(need(5).rules, 2);
        assert_eq!(need(6).rules, 3);
        assert_eq!(need(5).certificates, 5);
    }

    #[test]
    fn slots_live_beside_priorities() {
        assert_eq!(
            slot_key("arn:l/1", Kind::Certificate),
            "arn:l/1#slot:certificate"
        );
        assert_ne!(slot_key("arn:l/1", Kind::Rule), "arn:l/1");
    }
}
