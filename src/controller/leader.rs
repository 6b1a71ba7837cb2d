//! Leader election with a `coordination.k8s.io/v1` Lease: one controller replica writes, the
//! others stand by and take over once the leader's lease has expired.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the leader renews, and a standby checks.
    pub renew_every: Duration,
}

/// What to do with the lease as it stands.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseAction {
    /// No lease yet: create it, held by us.
    Create(Lease),
    /// Ours: renew it (a replace, guarded by its resourceVersion).
    Renew(Lease),
    /// Another holder's, expired: take it over.
    TakeOver(Lease),
    /// Another holder's, still valid.
    StandBy { holder: String },
}

/// Decides from the current lease (if any) at `now`.
pub fn decide(current: Option<&Lease>, options: &LeaseOptions, now: Timestamp) -> LeaseAction {
    let duration = i32::try_from(options.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(current) = current else {
        return LeaseAction::Create(Lease {
            metadata: ObjectMeta {
                name: Some(options.name.clone()),
                namespace: Some(options.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(options.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        });
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mut next = current.clone();
    if holder == options.identity {
        let mut renewed = spec;
        renewed.renew_time = Some(MicroTime(now));
        renewed.lease_duration_seconds = Some(duration);
        next.spec = Some(renewed);
        return LeaseAction::Renew(next);
    }
    let held_for = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = match &spec.renew_time {
        Some(MicroTime(renewed)) => renewed.saturating_add(held_for).is_ok_and(|end| end < now),
        None => true,
    };
    if holder.is_empty() || expired {
        let mut taken = spec;
        taken.holder_identity = Some(options.identity.clone());
        taken.lease_duration_seconds = Some(duration);
        taken.acquire_time = Some(MicroTime(now));
        taken.renew_time = Some(MicroTime(now));
        taken.lease_transitions = Some(taken.lease_transitions.unwrap_or(0) + 1);
        next.spec = Some(taken);
        return LeaseAction::TakeOver(next);
    }
    LeaseAction::StandBy { holder }
}

/// One round: reads the lease and acts; returns whether this replica leads.
pub async fn round(api: &Api<Lease>, options: &LeaseOptions) -> Result<bool, kube::Error> {
    let current = api.get_opt(&options.name).await?;
    match decide(current.as_ref(), options, Timestamp::now()) {
        LeaseAction::Create(lease) => {
            api.create(&PostParams::default(), &lease).await?;
            Ok(true)
        }
        LeaseAction::Renew(lease) | LeaseAction::TakeOver(lease) => {
            api.replace(&options.name, &PostParams::default(), &lease)
                .await?;
            Ok(true)
        }
        LeaseAction::StandBy { .. } => Ok(false),
    }
}

/// Keeps `leading` in step with the lease until the process ends, notifying `elected` when
/// this replica starts leading. A replica that cannot renew stops leading before its lease
/// could have expired.
pub async fn run(
    client: Client,
    options: LeaseOptions,
    leading: Arc<AtomicBool>,
    elected: Arc<tokio::sync::Notify>,
) {
    let api: Api<Lease> = Api::namespaced(client, &options.namespace);
    loop {
        let now_leading = match round(&api, &options).await {
            Ok(leads) => leads,
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Someone else wrote it between our read and our write.
                false
            }
            Err(error) => {
                warn!(%error, "cannot read or write the leader lease");
                false
            }
        };
        if leading.swap(now_leading, Ordering::SeqCst) != now_leading {
            if now_leading {
                info!(identity = %options.identity, "leading: this replica writes");
                elected.notify_one();
            } else {
                info!(identity = %options.identity, "standing by: another replica leads");
            }
        }
        tokio::time::sleep(options.renew_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(identity: &str) -> LeaseOptions {
        LeaseOptions {
            namespace: "coral-system".into(),
            name: "coral-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("time")
    }

    #[test]
    fn controller_lease_is_created_renewed_respected_and_taken_over_when_expired() {
        let LeaseAction::Create(lease) = decide(None, &options("a"), at(0)) else {
            panic!("no lease: create it");
        };
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));

        let LeaseAction::Renew(renewed) = decide(Some(&lease), &options("a"), at(5)) else {
            panic!("ours: renew it");
        };
        assert_eq!(
            renewed.spec.as_ref().and_then(|s| s.renew_time.clone()),
            Some(MicroTime(at(5)))
        );

        assert_eq!(
            decide(Some(&renewed), &options("b"), at(19)),
            LeaseAction::StandBy { holder: "a".into() },
            "renewed at 5 for 15 s: valid until 20"
        );
        let LeaseAction::TakeOver(taken) = decide(Some(&renewed), &options("b"), at(21)) else {
            panic!("expired: take it over");
        };
        let spec = taken.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(21))));
    }
}
