//! Copies of the pull secrets ImageSets reference, kept in Coral's namespace so that agents
//! read Secrets in that one namespace only.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::api::ImageSet;

/// Label on every copy.
pub const COPY_LABEL: &str = "coral.dev/pull-secret-copy";
/// Annotation naming the source, `namespace/name`.
pub const SOURCE_ANNOTATION: &str = "coral.dev/source";

/// The name of the copy of `namespace/name`: a hash, so that no two sources collide and any
/// source name fits.
pub fn copy_name(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("coral-pull-{hex}")
}

/// The copy a source secret should have in `coral_namespace`.
pub fn desired_copy(source: &Secret, coral_namespace: &str) -> Secret {
    let namespace = source.metadata.namespace.clone().unwrap_or_default();
    let name = source.metadata.name.clone().unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(copy_name(&namespace, &name)),
            namespace: Some(coral_namespace.to_string()),
            labels: Some(BTreeMap::from([
                (COPY_LABEL.to_string(), "true".to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "coral".to_string(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                SOURCE_ANNOTATION.to_string(),
                format!("{namespace}/{name}"),
            )])),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Secret::default()
    }
}

/// Whether an existing copy differs from the desired one in what Coral sets.
pub fn differs(existing: &Secret, desired: &Secret) -> bool {
    existing.type_ != desired.type_
        || existing.data != desired.data
        || existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_ANNOTATION))
            != desired
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SOURCE_ANNOTATION))
}

/// Brings the copies in `coral_namespace` in line with `sources` (`(namespace, name)` of every
/// referenced secret): creates and updates copies, deletes those no longer referenced. Returns
/// the sources that do not exist, as `namespace/name`.
pub async fn sync_copies(
    client: &Client,
    coral_namespace: &str,
    sources: &BTreeSet<(String, String)>,
) -> Result<BTreeSet<String>, kube::Error> {
    let copies: Api<Secret> = Api::namespaced(client.clone(), coral_namespace);
    let existing: BTreeMap<String, Secret> = copies
        .list(&ListParams::default().labels(&format!("{COPY_LABEL}=true")))
        .await?
        .items
        .into_iter()
        .filter_map(|s| Some((s.metadata.name.clone()?, s)))
        .collect();
    let mut missing = BTreeSet::new();
    let mut wanted = BTreeSet::new();
    for (namespace, name) in sources {
        let copy = copy_name(namespace, name);
        wanted.insert(copy.clone());
        let source = Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?;
        let Some(source) = source else {
            missing.insert(format!("{namespace}/{name}"));
            continue;
        };
        let desired = desired_copy(&source, coral_namespace);
        match existing.get(&copy) {
            None => {
                copies.create(&PostParams::default(), &desired).await?;
                info!(source = %format!("{namespace}/{name}"), %copy, "pull secret copied");
            }
            Some(current) if differs(current, &desired) => {
                let mut replacement = desired;
                replacement.metadata.resource_version = current.metadata.resource_version.clone();
                copies
                    .replace(&copy, &PostParams::default(), &replacement)
                    .await?;
                info!(source = %format!("{namespace}/{name}"), %copy, "pull secret copy updated");
            }
            Some(_) => {}
        }
    }
    for name in existing.keys().filter(|name| !wanted.contains(*name)) {
        copies.delete(name, &DeleteParams::default()).await?;
        info!(copy = %name, "pull secret copy no longer referenced; deleted");
    }
    Ok(missing)
}

/// Referenced pull secrets of live ImageSets, `(namespace, name)`.
pub fn referenced_secrets(sets: &[&ImageSet]) -> BTreeSet<(String, String)> {
    sets.iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .flat_map(|s| {
            let namespace = s.metadata.namespace.clone().unwrap_or_default();
            s.spec
                .image_pull_secrets
                .iter()
                .map(move |r| (namespace.clone(), r.name.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_copy_names_do_not_collide_and_fit() {
        let a = copy_name("shop", "pull");
        assert_eq!(a, copy_name("shop", "pull"), "stable");
        assert_ne!(a, copy_name("shop-pull", ""));
        assert_ne!(a, copy_name("sho", "p/pull"));
        assert_eq!(a.len(), "coral-pull-".len() + 20);
        assert!(copy_name("n", &"x".repeat(253)).len() < 64);
    }
}
