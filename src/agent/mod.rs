//! The node agent: keeps the images that ImageSets want on this node's container runtime, over
//! the CRI, and records what the node holds. `coral prefetch` runs the same engine once.

pub mod cri;
pub mod engine;
pub mod node;
pub mod pin;
pub mod prefetch;
pub mod record;
pub mod retention;
pub mod tracker;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::ImageSet;
use crate::image::ImageReference;
use crate::index::validate_image_set;

/// The pull secrets one image may use: `(namespace, name)` of each, from every ImageSet that
/// wants the image.
pub type SecretRefs = Vec<(String, String)>;

/// The mirror copies of public wanted images, ready to pull: for each source image an ImageSet
/// mirrors without pull secrets and whose status records it `mirrored`, its mirror reference.
/// Private images are never pulled through a mirror (the source checks their credentials).
pub fn mirror_copies(
    sets: &[&ImageSet],
    wanted: &BTreeMap<ImageReference, SecretRefs>,
) -> std::collections::HashMap<ImageReference, ImageReference> {
    let mut copies = std::collections::HashMap::new();
    for set in sets {
        if set.spec.mirror.is_none() || !set.spec.image_pull_secrets.is_empty() {
            continue;
        }
        for image in set.status.iter().flat_map(|status| &status.images) {
            let Some(copy) = image
                .mirror
                .as_ref()
                .filter(|c| c.state == crate::api::MirrorState::Mirrored)
            else {
                continue;
            };
            let (Ok(source), Ok(mirror)) = (
                ImageReference::parse(&image.normalized),
                ImageReference::parse(&copy.reference),
            ) else {
                continue;
            };
            if wanted.get(&source).is_some_and(Vec::is_empty) {
                copies.entry(source).or_insert(mirror);
            }
        }
    }
    copies
}

/// The valid ImageSets whose selector matches a node with `labels`, each with its checked spec.
fn targeting<'a>(
    sets: &'a [&'a ImageSet],
    labels: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = (&'a ImageSet, crate::index::ValidImageSet)> + 'a {
    sets.iter().filter_map(move |set| {
        let valid = validate_image_set(&set.spec).ok()?;
        valid.selector.matches(labels).then_some((*set, valid))
    })
}

/// The images wanted on a node with `labels`: the union of the ImageSets whose selector
/// matches, each with the pull secrets of those ImageSets. An ImageSet's retiring images (in
/// its status: gone from it while workloads still require their labels) stay wanted, and are
/// all that an ImageSet being deleted still wants. Invalid ImageSets want nothing.
pub fn wanted_images(
    sets: &[&ImageSet],
    labels: &BTreeMap<String, String>,
) -> BTreeMap<ImageReference, SecretRefs> {
    let mut wanted: BTreeMap<ImageReference, SecretRefs> = BTreeMap::new();
    for (set, valid) in targeting(sets, labels) {
        let retiring = set
            .status
            .iter()
            .flat_map(|status| &status.retiring)
            .filter_map(|retiring| ImageReference::parse(&retiring.image).ok());
        let images: Vec<ImageReference> = if set.metadata.deletion_timestamp.is_some() {
            retiring.collect()
        } else {
            valid.images.into_iter().chain(retiring).collect()
        };
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        for image in images {
            let secrets = wanted.entry(image).or_default();
            for secret in &set.spec.image_pull_secrets {
                let key = (namespace.clone(), secret.name.clone());
                if !secrets.contains(&key) {
                    secrets.push(key);
                }
            }
        }
    }
    wanted
}

/// How often each wanted image is resolved again: the shortest `spec.refresh` of the ImageSets
/// that want it on a node with `labels`. Images no such ImageSet refreshes are not in it.
pub fn refresh_periods(
    sets: &[&ImageSet],
    labels: &BTreeMap<String, String>,
) -> std::collections::HashMap<ImageReference, Duration> {
    let mut periods = std::collections::HashMap::new();
    for (set, valid) in targeting(sets, labels) {
        let Some(period) = valid.refresh else {
            continue;
        };
        if set.metadata.deletion_timestamp.is_some() {
            continue;
        }
        for image in valid.images {
            periods
                .entry(image)
                .and_modify(|p: &mut Duration| *p = (*p).min(period))
                .or_insert(period);
        }
    }
    periods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retiring_images_stay_wanted_even_when_their_set_is_being_deleted() {
        let set = |name: &str, images: &[&str], retiring: &[&str]| -> ImageSet {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"images": images, "imagePullSecrets": [{"name": "creds"}]},
                "status": {"retiring": retiring.iter().map(|i| serde_json::json!({
                    "image": i, "label": "image.coral.dev/x", "workloadCount": 1,
                })).collect::<Vec<_>>()},
            }))
            .expect("ImageSet")
        };
        let names = |wanted: &BTreeMap<ImageReference, SecretRefs>| -> Vec<String> {
            wanted.keys().map(ToString::to_string).collect()
        };
        let live = set("web", &["nginx:1.28"], &["docker.io/library/nginx:1.27"]);
        let wanted = wanted_images(&[&live], &BTreeMap::new());
        assert_eq!(
            names(&wanted),
            [
                "docker.io/library/nginx:1.27",
                "docker.io/library/nginx:1.28"
            ]
        );
        assert_eq!(
            wanted[&ImageReference::parse("nginx:1.27").expect("valid")],
            vec![("shop".to_string(), "creds".to_string())],
            "pulled again, if it must be, with the set's secrets"
        );
        let mut deleting = live.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            names(&wanted_images(&[&deleting], &BTreeMap::new())),
            ["docker.io/library/nginx:1.27"]
        );
    }

    #[test]
    fn each_image_refreshes_at_the_shortest_period_of_the_sets_that_want_it_here() {
        let set = |name: &str, images: &[&str], pool: &str, refresh: Option<&str>| -> ImageSet {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": pool}},
                         "refresh": refresh},
            }))
            .expect("ImageSet")
        };
        let hourly = set("hourly", &["nginx:1.27", "redis:7"], "web", Some("1h"));
        let often = set("often", &["nginx:1.27"], "web", Some("10m"));
        let elsewhere = set("elsewhere", &["redis:7"], "batch", Some("1m"));
        let never = set("never", &["busybox"], "web", None);
        let mut deleting = set("deleting", &["redis:7"], "web", Some("30s"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let labels = BTreeMap::from([("pool".to_string(), "web".to_string())]);
        let periods = refresh_periods(&[&hourly, &often, &elsewhere, &never, &deleting], &labels);
        let of = |image: &str| {
            periods
                .get(&ImageReference::parse(image).expect("valid"))
                .copied()
        };
        assert_eq!(of("nginx:1.27"), Some(Duration::from_secs(600)));
        assert_eq!(of("redis:7"), Some(Duration::from_secs(3600)));
        assert_eq!(of("busybox"), None);
        assert_eq!(periods.len(), 2);
    }

    #[test]
    fn wanted_images_are_the_union_of_matching_sets_with_their_secrets() {
        let set = |name: &str,
                   images: &[&str],
                   selector: serde_json::Value,
                   secrets: &[&str]|
         -> ImageSet {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "images": images,
                    "nodeSelector": selector,
                    "imagePullSecrets": secrets.iter().map(|s| serde_json::json!({"name": s})).collect::<Vec<_>>(),
                },
            }))
            .expect("ImageSet")
        };
        let web = set(
            "web",
            &["nginx:1.27", "redis:7"],
            serde_json::json!({"matchLabels": {"pool": "web"}}),
            &["a"],
        );
        let all = set(
            "all",
            &["docker.io/library/nginx:1.27", "busybox"],
            serde_json::json!({}),
            &["b"],
        );
        let batch = set(
            "batch",
            &["spark:3"],
            serde_json::json!({"matchLabels": {"pool": "batch"}}),
            &[],
        );
        let broken = set("broken", &["UPPER:case"], serde_json::json!({}), &[]);
        let mut deleted = set("deleted", &["memcached:1.6"], serde_json::json!({}), &[]);
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let labels = BTreeMap::from([("pool".to_string(), "web".to_string())]);
        let wanted = wanted_images(&[&web, &all, &batch, &broken, &deleted], &labels);
        let names: Vec<String> = wanted.keys().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "docker.io/library/busybox:latest",
                "docker.io/library/nginx:1.27",
                "docker.io/library/redis:7"
            ]
        );
        let nginx = &wanted[&ImageReference::parse("nginx:1.27").expect("valid")];
        assert_eq!(
            nginx,
            &vec![
                ("shop".to_string(), "a".to_string()),
                ("shop".to_string(), "b".to_string())
            ]
        );
        let none = wanted_images(&[&web, &batch], &BTreeMap::new());
        assert!(
            none.is_empty(),
            "no labels: only sets with an empty selector"
        );
    }

    #[test]
    fn only_public_images_with_a_mirrored_copy_are_pulled_through_the_mirror() {
        let set = |name: &str, secrets: bool, state: &str| -> ImageSet {
            let secrets: Vec<serde_json::Value> = if secrets {
                vec![serde_json::json!({"name": "creds"})]
            } else {
                Vec::new()
            };
            serde_json::from_value(serde_json::json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"images": [format!("{name}:1")], "imagePullSecrets": secrets, "mirror": {"registry": "local"}},
                "status": {"images": [{
                    "image": format!("{name}:1"), "normalized": format!("docker.io/library/{name}:1"), "label": "x",
                    "mirror": {"reference": format!("localhost:30500/docker.io/library/{name}:1"), "state": state},
                }]},
            }))
            .expect("ImageSet")
        };
        let public = set("web", false, "mirrored");
        let private = set("secret", true, "mirrored");
        let copying = set("cache", false, "copying");
        let sets = [&public, &private, &copying];
        let wanted = wanted_images(&sets, &BTreeMap::new());
        let copies = mirror_copies(&sets, &wanted);
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(
            copies[&ImageReference::parse("web:1").expect("reference")].to_string(),
            "localhost:30500/docker.io/library/web:1"
        );
    }
}
