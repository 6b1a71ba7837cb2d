//! An index kept up to date by watch events, without a store of the watched objects beside it:
//! each Node, NodeImage, ImageSet, Registry and Namespace is read into the index as it arrives and
//! dropped. A Node's status (the images the kubelet reports, conditions, addresses) is never
//! kept, and neither is a NodeImage beyond its failed pulls.
//!
//! A watch's (re)list is `Init`, `InitApply` for every object, then `InitDone`: objects the
//! index holds that the list did not name are gone, and are forgotten then.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use serde::{Deserialize, Deserializer};

use super::ClusterIndex;
use crate::api::{ImageSet, ImageState, Registry};
use crate::image::ImageReference;

/// Of an object's metadata, what a watch needs (name, namespace, uid, resourceVersion) and
/// labels. Annotations and managed fields (on a Node, a list of every label key, for each
/// manager) are skipped while parsing, never allocated.
fn slim_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Slim {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
    }
    let slim = Slim::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: slim.name,
        namespace: slim.namespace,
        uid: slim.uid,
        resource_version: slim.resource_version,
        labels: slim.labels,
        ..ObjectMeta::default()
    })
}

/// A Node as the webhook watches it: labels, taints and `spec.unschedulable`. The rest (its
/// status above all: the images the kubelet reports, conditions, addresses) is skipped while
/// the list or event is parsed.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchedNode {
    #[serde(deserialize_with = "slim_metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WatchedNodeSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchedNodeSpec {
    #[serde(default)]
    pub taints: Vec<Taint>,
    #[serde(default)]
    pub unschedulable: bool,
}

/// A NodeImage as the webhook watches it: its node and the images whose pulls failed there.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedNodeImage {
    #[serde(deserialize_with = "slim_metadata")]
    pub metadata: ObjectMeta,
    pub spec: WatchedNodeImageSpec,
    #[serde(default, deserialize_with = "failed_images")]
    pub status: BTreeSet<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedNodeImageSpec {
    pub node_name: String,
}

/// The normalized references of `status.images` entries in state `failed`.
fn failed_images<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeSet<String>, D::Error> {
    #[derive(Deserialize)]
    struct Entry {
        image: String,
        state: ImageState,
    }
    #[derive(Deserialize)]
    struct Status {
        #[serde(default)]
        images: Vec<Entry>,
    }
    let status = Option::<Status>::deserialize(deserializer)?;
    Ok(status
        .into_iter()
        .flat_map(|status| status.images)
        .filter(|entry| entry.state == ImageState::Failed)
        .filter_map(|entry| ImageReference::parse(&entry.image).ok())
        .map(|reference| reference.to_string())
        .collect())
}

/// `kube::Resource` for a cluster-scoped core or Coral kind watched in a slim shape.
macro_rules! watched_resource {
    ($type:ty, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = kube::core::ClusterResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

watched_resource!(WatchedNode, "", "v1", "Node", "nodes");
watched_resource!(
    WatchedNodeImage,
    "coral.dev",
    "v1alpha1",
    "NodeImage",
    "nodeimages"
);

/// The resources an index is fed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    ImageSets,
    Nodes,
    Namespaces,
    NodeImages,
    Registries,
}

impl Resource {
    const ALL: [Resource; 5] = [
        Self::ImageSets,
        Self::Nodes,
        Self::Namespaces,
        Self::NodeImages,
        Self::Registries,
    ];

    fn slot(self) -> usize {
        self as usize
    }
}

/// An index and where each watch is in its list.
#[derive(Debug, Default)]
pub struct LiveIndex {
    index: ClusterIndex,
    /// Keys applied since the current (re)list began, per resource.
    relisting: [Option<BTreeSet<String>>; 5],
    /// Resources whose first list is complete.
    listed: [bool; 5],
}

/// How one resource's objects go in and out of the index.
trait Feed: Sized {
    const RESOURCE: Resource;
    /// The key the index knows the object by.
    fn key(&self) -> Option<String>;
    /// Whether the index changed.
    fn apply(&self, index: &mut ClusterIndex) -> bool;
    fn remove(key: &str, index: &mut ClusterIndex) -> bool;
    fn keys(index: &ClusterIndex) -> Vec<String>;
}

impl LiveIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every resource has been listed once.
    pub fn listed(&self) -> bool {
        Resource::ALL.iter().all(|r| self.listed[r.slot()])
    }

    /// The index as it is now, for a snapshot: its nodes are shared, not copied.
    pub fn index(&mut self) -> ClusterIndex {
        self.index.prune_symbols();
        self.index.clone()
    }

    pub fn image_set(&mut self, event: Event<ImageSet>) -> bool {
        self.feed(event)
    }

    pub fn node(&mut self, event: Event<WatchedNode>) -> bool {
        self.feed(event)
    }

    pub fn namespace(&mut self, event: Event<PartialObjectMeta<Namespace>>) -> bool {
        self.feed(event)
    }

    pub fn node_image(&mut self, event: Event<WatchedNodeImage>) -> bool {
        self.feed(event)
    }

    pub fn registry(&mut self, event: Event<Registry>) -> bool {
        self.feed(event)
    }

    /// Applies one event; true when the index changed and the list is complete (a Node's
    /// heartbeat, an ImageSet's status update change nothing the index holds).
    fn feed<K: Feed>(&mut self, event: Event<K>) -> bool {
        let slot = K::RESOURCE.slot();
        match event {
            Event::Init => {
                self.relisting[slot] = Some(BTreeSet::new());
                false
            }
            Event::InitApply(object) => {
                let _ = object.apply(&mut self.index);
                if let (Some(seen), Some(key)) = (&mut self.relisting[slot], object.key()) {
                    seen.insert(key);
                }
                false
            }
            Event::InitDone => {
                if let Some(seen) = self.relisting[slot].take() {
                    for key in K::keys(&self.index) {
                        if !seen.contains(&key) {
                            let _ = K::remove(&key, &mut self.index);
                        }
                    }
                }
                self.listed[slot] = true;
                true
            }
            Event::Apply(object) => object.apply(&mut self.index),
            Event::Delete(object) => object
                .key()
                .is_some_and(|key| K::remove(&key, &mut self.index)),
        }
    }
}

impl Feed for ImageSet {
    const RESOURCE: Resource = Resource::ImageSets;

    fn key(&self) -> Option<String> {
        let namespace = self.metadata.namespace.as_deref().unwrap_or_default();
        Some(format!("{namespace}/{}", self.metadata.name.as_deref()?))
    }

    fn apply(&self, index: &mut ClusterIndex) -> bool {
        index.apply_image_set(self)
    }

    fn remove(key: &str, index: &mut ClusterIndex) -> bool {
        key.split_once('/')
            .is_some_and(|(namespace, name)| index.delete_image_set(namespace, name))
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index
            .image_sets
            .keys()
            .map(|(namespace, name)| format!("{namespace}/{name}"))
            .collect()
    }
}

impl Feed for WatchedNode {
    const RESOURCE: Resource = Resource::Nodes;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn apply(&self, index: &mut ClusterIndex) -> bool {
        self.metadata.name.as_ref().is_some_and(|name| {
            index.apply_node_fields(
                name,
                self.metadata.labels.iter().flatten(),
                &self.spec.taints,
                self.spec.unschedulable,
            )
        })
    }

    fn remove(key: &str, index: &mut ClusterIndex) -> bool {
        index.delete_node(key)
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.nodes.keys().cloned().collect()
    }
}

impl Feed for Registry {
    const RESOURCE: Resource = Resource::Registries;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn apply(&self, index: &mut ClusterIndex) -> bool {
        index.apply_registry(self)
    }

    fn remove(key: &str, index: &mut ClusterIndex) -> bool {
        index.delete_registry(key)
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.registries.keys().cloned().collect()
    }
}

impl Feed for PartialObjectMeta<Namespace> {
    const RESOURCE: Resource = Resource::Namespaces;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn apply(&self, index: &mut ClusterIndex) -> bool {
        self.metadata.name.as_ref().is_some_and(|name| {
            index.apply_namespace(name, self.metadata.labels.clone().unwrap_or_default())
        })
    }

    fn remove(key: &str, index: &mut ClusterIndex) -> bool {
        index.delete_namespace(key)
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.namespaces.keys().cloned().collect()
    }
}

/// A NodeImage counts by the node it describes.
impl Feed for WatchedNodeImage {
    const RESOURCE: Resource = Resource::NodeImages;

    fn key(&self) -> Option<String> {
        Some(self.spec.node_name.clone())
    }

    fn apply(&self, index: &mut ClusterIndex) -> bool {
        index.set_node_failures(&self.spec.node_name, self.status.clone())
    }

    fn remove(key: &str, index: &mut ClusterIndex) -> bool {
        index.set_node_failures(key, BTreeSet::new())
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.failed.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::api::ImageSetSpec;

    fn node(name: &str, labels: Value, tainted: bool) -> WatchedNode {
        let taints = if tainted {
            json!([{"key": "dedicated", "effect": "NoSchedule"}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels,
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:metadata": {}}}]},
            "spec": {"taints": taints, "podCIDR": "10.0.0.0/24"},
            "status": {"images": [{"names": ["docker.io/library/nginx:1.27"], "sizeBytes": 1}]},
        }))
        .expect("Node")
    }

    fn image_set(name: &str, images: &[&str]) -> ImageSet {
        let mut set = ImageSet::new(
            name,
            ImageSetSpec {
                images: images.iter().map(|i| i.to_string()).collect(),
                ..ImageSetSpec::default()
            },
        );
        set.metadata.namespace = Some("shop".into());
        set
    }

    fn node_image(node: &str, failed: &str) -> WatchedNodeImage {
        serde_json::from_value(json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
            "metadata": {"name": node},
            "spec": {"nodeName": node},
            "status": {"available": 1, "images": [
                {"image": failed, "label": "image.coral.dev/x", "state": "failed", "attempts": 3, "lastError": "denied"},
                {"image": "docker.io/library/redis:7", "label": "image.coral.dev/y", "state": "available", "digest": "sha256:00"},
            ]},
        }))
        .expect("NodeImage")
    }

    fn list<K>(live: &mut LiveIndex, feed: fn(&mut LiveIndex, Event<K>) -> bool, objects: Vec<K>) {
        assert!(!feed(live, Event::Init));
        for object in objects {
            assert!(!feed(live, Event::InitApply(object)));
        }
        assert!(feed(live, Event::InitDone));
    }

    #[test]
    fn watched_shapes_keep_what_the_index_reads_and_nothing_else() {
        let node = node("a", json!({"pool": "web"}), true);
        assert_eq!(node.metadata.name.as_deref(), Some("a"));
        assert!(node.metadata.managed_fields.is_none());
        assert_eq!(node.spec.taints.len(), 1);
        let node_image = node_image("a", "nginx:1.27");
        assert_eq!(
            node_image.status.iter().collect::<Vec<_>>(),
            ["docker.io/library/nginx:1.27"]
        );
        let without_status: WatchedNodeImage = serde_json::from_value(json!({
            "metadata": {"name": "b"}, "spec": {"nodeName": "b"}
        }))
        .expect("NodeImage without status");
        assert!(without_status.status.is_empty());
        use kube::Resource as _;
        assert_eq!(WatchedNode::url_path(&(), None), "/api/v1/nodes");
        assert_eq!(
            WatchedNodeImage::url_path(&(), None),
            "/apis/coral.dev/v1alpha1/nodeimages"
        );
    }

    #[test]
    fn events_keep_the_index_like_a_fresh_list_would() {
        let image = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c";
        let mut live = LiveIndex::new();
        list(
            &mut live,
            LiveIndex::image_set,
            vec![image_set("web", &["nginx:1.27"])],
        );
        list(
            &mut live,
            LiveIndex::node,
            vec![
                node("a", json!({image: "available"}), false),
                node("b", json!({image: "available"}), true),
            ],
        );
        assert!(
            !live.listed(),
            "namespaces and NodeImages are not listed yet"
        );
        list(&mut live, LiveIndex::namespace, Vec::new());
        list(
            &mut live,
            LiveIndex::node_image,
            vec![node_image("b", "docker.io/library/nginx:1.27")],
        );
        assert!(!live.listed(), "Registries are not listed yet");
        list(&mut live, LiveIndex::registry, Vec::new());
        assert!(live.listed());
        let index = live.index();
        assert_eq!(index.label_counts().get(image), Some(&2));
        let nginx = &index.image_availability()["docker.io/library/nginx:1.27"];
        assert_eq!((nginx.nodes_available, nginx.nodes_failed), (2, 1));

        // A Node update that changes nothing the index holds (a heartbeat, an annotation)
        // builds no snapshot.
        assert!(!live.node(Event::Apply(node("a", json!({image: "available"}), false))));
        assert!(!live.node_image(Event::Apply(node_image(
            "b",
            "docker.io/library/nginx:1.27"
        ))));

        // Changes and deletions as they come.
        assert!(live.node(Event::Apply(node("a", json!({}), false))));
        assert!(live.node_image(Event::Delete(node_image("b", "x"))));
        let index = live.index();
        assert_eq!(index.label_counts().get(image), Some(&1));
        assert_eq!(
            index.image_availability()["docker.io/library/nginx:1.27"].nodes_failed,
            0
        );

        // A relist that no longer names node b and the ImageSet forgets them.
        list(
            &mut live,
            LiveIndex::node,
            vec![node("a", json!({}), false)],
        );
        list(&mut live, LiveIndex::image_set, Vec::new());
        let index = live.index();
        assert_eq!(index.node_count(), 1);
        assert!(index.image_availability().is_empty());
        assert!(index.label_counts().is_empty());
    }
}
