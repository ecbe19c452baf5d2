//! Instance states and the one table of allowed transitions between them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceState {
    PendingProvisioning,
    Provisioning,
    Active,
    Scaling,
    Restarting,
    Updating,
    Suspending,
    Suspended,
    Resuming,
    Restoring,
    PendingDeprovisioning,
    Deprovisioning,
    Deprovisioned,
    Failed,
}

use InstanceState::*;

/// Every allowed transition `(from, to)`. Anything not listed is refused.
///
/// Why these: a mutating operation moves an ACTIVE (or SUSPENDED) instance into its
/// "-ing" state; success or a clean rollback returns it to ACTIVE (or SUSPENDED), and only a
/// rollback that itself failed leaves it FAILED. A FAILED instance can be provisioned again
/// (retry) or deleted. DEPROVISIONED is final: the (tenant, environment) slot is free again
/// and a new instance is a new record.
pub const TRANSITIONS: &[(InstanceState, InstanceState)] = &[
    (PendingProvisioning, Provisioning),
    (PendingProvisioning, Failed),
    (Provisioning, Active),
    (Provisioning, Failed),
    (Active, Scaling),
    (Active, Restarting),
    (Active, Updating),
    (Active, Suspending),
    (Active, Restoring),
    (Active, PendingDeprovisioning),
    (Scaling, Active),
    (Scaling, Failed),
    (Restarting, Active),
    (Restarting, Failed),
    (Updating, Active),
    (Updating, Failed),
    (Suspending, Suspended),
    (Suspending, Active),
    (Suspending, Failed),
    (Suspended, Resuming),
    (Suspended, PendingDeprovisioning),
    (Resuming, Active),
    (Resuming, Suspended),
    (Resuming, Failed),
    (Restoring, Active),
    (Restoring, Failed),
    (Suspended, Restoring),
    (Restoring, Suspended),
    (PendingDeprovisioning, Deprovisioning),
    (PendingDeprovisioning, Failed),
    (Deprovisioning, Deprovisioned),
    (Deprovisioning, Failed),
    (Failed, Provisioning),
    // A STUCK scale leaves the instance FAILED; retrying that operation scales again.
    (Failed, Scaling),
    // A STUCK suspend or resume leaves it FAILED too; retrying that operation runs it again.
    (Failed, Suspending),
    (Failed, Resuming),
    // Likewise a STUCK update.
    (Failed, Updating),
    // And a STUCK restore.
    (Failed, Restoring),
    (Failed, PendingDeprovisioning),
    (Failed, Deprovisioning),
];

impl InstanceState {
    pub const ALL: [InstanceState; 14] = [
        PendingProvisioning,
        Provisioning,
        Active,
        Scaling,
        Restarting,
        Updating,
        Suspending,
        Suspended,
        Resuming,
        Restoring,
        PendingDeprovisioning,
        Deprovisioning,
        Deprovisioned,
        Failed,
    ];

    pub fn can_transition_to(self, to: InstanceState) -> bool {
        TRANSITIONS.contains(&(self, to))
    }

    /// True once the instance is gone for good; such a record no longer holds the
    /// per-(tenant, environment) slot.
    pub fn is_terminal(self) -> bool {
        self == Deprovisioned
    }

    /// True while some operation is changing the instance.
    pub fn is_transitional(self) -> bool {
        !matches!(self, Active | Suspended | Deprovisioned | Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PendingProvisioning => "PENDING_PROVISIONING",
            Provisioning => "PROVISIONING",
            Active => "ACTIVE",
            Scaling => "SCALING",
            Restarting => "RESTARTING",
            Updating => "UPDATING",
            Suspending => "SUSPENDING",
            Suspended => "SUSPENDED",
            Resuming => "RESUMING",
            Restoring => "RESTORING",
            PendingDeprovisioning => "PENDING_DEPROVISIONING",
            Deprovisioning => "DEPROVISIONING",
            Deprovisioned => "DEPROVISIONED",
            Failed => "FAILED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The expected outgoing states of every state, written independently of `TRANSITIONS`
    /// as the lifecycle reads in the design; every one of the 14 × 14 pairs is checked.
    fn expected(from: InstanceState) -> &'static [InstanceState] {
        match from {
            PendingProvisioning => &[Provisioning, Failed],
            Provisioning => &[Active, Failed],
            Active => &[
                Scaling,
                Restarting,
                Updating,
                Suspending,
                Restoring,
                PendingDeprovisioning,
            ],
            Scaling | Restarting | Updating => &[Active, Failed],
            Restoring => &[Active, Suspended, Failed],
            Suspending => &[Suspended, Active, Failed],
            Suspended => &[Resuming, Restoring, PendingDeprovisioning],
            Resuming => &[Active, Suspended, Failed],
            PendingDeprovisioning => &[Deprovisioning, Failed],
            Deprovisioning => &[Deprovisioned, Failed],
            Deprovisioned => &[],
            Failed => &[
                Provisioning,
                Scaling,
                Suspending,
                Resuming,
                Updating,
                Restoring,
                PendingDeprovisioning,
                Deprovisioning,
            ],
        }
    }

    #[test]
    fn every_pair_of_states() {
        let mut checked = 0;
        for from in InstanceState::ALL {
            for to in InstanceState::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    expected(from).contains(&to),
                    "{from} -> {to}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 196);
    }

    #[test]
    fn table_has_no_duplicates_or_self_loops() {
        let unique: BTreeSet<_> = TRANSITIONS.iter().collect();
        assert_eq!(unique.len(), TRANSITIONS.len());
        assert!(TRANSITIONS.iter().all(|(a, b)| a != b));
    }

    fn reachable_from(start: InstanceState) -> BTreeSet<InstanceState> {
        let mut seen = BTreeSet::from([start]);
        let mut frontier = vec![start];
        while let Some(state) = frontier.pop() {
            for to in InstanceState::ALL {
                if state.can_transition_to(to) && seen.insert(to) {
                    frontier.push(to);
                }
            }
        }
        seen
    }

    #[test]
    fn every_state_is_reachable_and_can_be_retired() {
        let all: BTreeSet<_> = InstanceState::ALL.into_iter().collect();
        assert_eq!(reachable_from(PendingProvisioning), all);
        for state in InstanceState::ALL {
            assert!(
                reachable_from(state).contains(&Deprovisioned),
                "{state} can never be deprovisioned"
            );
        }
    }

    #[test]
    fn deprovisioned_is_the_only_terminal_state() {
        for state in InstanceState::ALL {
            let has_exit = InstanceState::ALL
                .iter()
                .any(|to| state.can_transition_to(*to));
            assert_eq!(!has_exit, state.is_terminal(), "{state}");
        }
    }

    #[test]
    fn names_round_trip() {
        for state in InstanceState::ALL {
            assert_eq!(InstanceState::parse(state.as_str()), Some(state));
        }
        assert_eq!(InstanceState::parse("active"), None);
    }
}
