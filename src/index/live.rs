//! An index kept up to date by watch events, without a store of the watched objects beside it:
//! each Node, NodeImage, ImageSet and Namespace is read into the index as it arrives and
//! dropped. A Node's status (the images the kubelet reports, conditions, addresses) is never
//! kept, and neither is a NodeImage beyond its failed pulls.
//!
//! A watch's (re)list is `Init`, `InitApply` for every object, then `InitDone`: objects the
//! index holds that the list did not name are gone, and are forgotten then.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;

use super::ClusterIndex;
use crate::api::{ImageSet, NodeImage};

/// The resources an index is fed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    ImageSets,
    Nodes,
    Namespaces,
    NodeImages,
}

impl Resource {
    const ALL: [Resource; 4] = [
        Self::ImageSets,
        Self::Nodes,
        Self::Namespaces,
        Self::NodeImages,
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
    relisting: [Option<BTreeSet<String>>; 4],
    /// Resources whose first list is complete.
    listed: [bool; 4],
}

/// How one resource's objects go in and out of the index.
trait Feed: Sized {
    const RESOURCE: Resource;
    /// The key the index knows the object by.
    fn key(&self) -> Option<String>;
    fn apply(&self, index: &mut ClusterIndex);
    fn remove(key: &str, index: &mut ClusterIndex);
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

    pub fn node(&mut self, event: Event<Node>) -> bool {
        self.feed(event)
    }

    pub fn namespace(&mut self, event: Event<PartialObjectMeta<Namespace>>) -> bool {
        self.feed(event)
    }

    pub fn node_image(&mut self, event: Event<NodeImage>) -> bool {
        self.feed(event)
    }

    /// Applies one event; true when the index may have changed in a way a snapshot shows
    /// (not while a list is still arriving).
    fn feed<K: Feed>(&mut self, event: Event<K>) -> bool {
        let slot = K::RESOURCE.slot();
        match event {
            Event::Init => {
                self.relisting[slot] = Some(BTreeSet::new());
                false
            }
            Event::InitApply(object) => {
                object.apply(&mut self.index);
                if let (Some(seen), Some(key)) = (&mut self.relisting[slot], object.key()) {
                    seen.insert(key);
                }
                false
            }
            Event::InitDone => {
                if let Some(seen) = self.relisting[slot].take() {
                    for key in K::keys(&self.index) {
                        if !seen.contains(&key) {
                            K::remove(&key, &mut self.index);
                        }
                    }
                }
                self.listed[slot] = true;
                true
            }
            Event::Apply(object) => {
                object.apply(&mut self.index);
                true
            }
            Event::Delete(object) => {
                if let Some(key) = object.key() {
                    K::remove(&key, &mut self.index);
                }
                true
            }
        }
    }
}

impl Feed for ImageSet {
    const RESOURCE: Resource = Resource::ImageSets;

    fn key(&self) -> Option<String> {
        let namespace = self.metadata.namespace.as_deref().unwrap_or_default();
        Some(format!("{namespace}/{}", self.metadata.name.as_deref()?))
    }

    fn apply(&self, index: &mut ClusterIndex) {
        index.apply_image_set(self);
    }

    fn remove(key: &str, index: &mut ClusterIndex) {
        if let Some((namespace, name)) = key.split_once('/') {
            index.delete_image_set(namespace, name);
        }
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index
            .image_sets
            .keys()
            .map(|(namespace, name)| format!("{namespace}/{name}"))
            .collect()
    }
}

impl Feed for Node {
    const RESOURCE: Resource = Resource::Nodes;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn apply(&self, index: &mut ClusterIndex) {
        index.apply_node_object(self);
    }

    fn remove(key: &str, index: &mut ClusterIndex) {
        index.delete_node(key);
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.nodes.keys().cloned().collect()
    }
}

impl Feed for PartialObjectMeta<Namespace> {
    const RESOURCE: Resource = Resource::Namespaces;

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn apply(&self, index: &mut ClusterIndex) {
        if let Some(name) = &self.metadata.name {
            index.apply_namespace(name, self.metadata.labels.clone().unwrap_or_default());
        }
    }

    fn remove(key: &str, index: &mut ClusterIndex) {
        index.delete_namespace(key);
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.namespaces.keys().cloned().collect()
    }
}

/// A NodeImage counts by the node it describes.
impl Feed for NodeImage {
    const RESOURCE: Resource = Resource::NodeImages;

    fn key(&self) -> Option<String> {
        Some(self.spec.node_name.clone())
    }

    fn apply(&self, index: &mut ClusterIndex) {
        index.apply_node_image(self);
    }

    fn remove(key: &str, index: &mut ClusterIndex) {
        index.set_node_failures(key, BTreeSet::new());
    }

    fn keys(index: &ClusterIndex) -> Vec<String> {
        index.failed.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::api::{ImageSetSpec, ImageState, NodeImageEntry, NodeImageSpec, NodeImageStatus};

    fn node(name: &str, labels: &[(&str, &str)], tainted: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: tainted.then(|| {
                    vec![Taint {
                        key: "dedicated".into(),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    }]
                }),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn image_set(name: &str, images: &[&str]) -> ImageSet {
        let mut set = ImageSet::new(
            name,
            ImageSetSpec {
                images: images.iter().map(|i| i.to_string()).collect(),
                node_selector: None,
                image_pull_secrets: Vec::new(),
            },
        );
        set.metadata.namespace = Some("shop".into());
        set
    }

    fn node_image(node: &str, failed: &str) -> NodeImage {
        let mut object = NodeImage::new(
            node,
            NodeImageSpec {
                node_name: node.to_string(),
            },
        );
        object.status = Some(NodeImageStatus {
            images: vec![NodeImageEntry {
                image: failed.to_string(),
                state: ImageState::Failed,
                ..NodeImageEntry::default()
            }],
            ..NodeImageStatus::default()
        });
        object
    }

    fn list<K>(live: &mut LiveIndex, feed: fn(&mut LiveIndex, Event<K>) -> bool, objects: Vec<K>) {
        assert!(!feed(live, Event::Init));
        for object in objects {
            assert!(!feed(live, Event::InitApply(object)));
        }
        assert!(feed(live, Event::InitDone));
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
                node("a", &[(image, "available")], false),
                node("b", &[(image, "available")], true),
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
        assert!(live.listed());
        let index = live.index();
        assert_eq!(index.label_counts().get(image), Some(&2));
        let nginx = &index.image_availability()["docker.io/library/nginx:1.27"];
        assert_eq!((nginx.nodes_available, nginx.nodes_failed), (2, 1));

        // Changes and deletions as they come.
        assert!(live.node(Event::Apply(node("a", &[], false))));
        assert!(live.node_image(Event::Delete(node_image("b", "x"))));
        let index = live.index();
        assert_eq!(index.label_counts().get(image), Some(&1));
        assert_eq!(
            index.image_availability()["docker.io/library/nginx:1.27"].nodes_failed,
            0
        );

        // A relist that no longer names node b and the ImageSet forgets them.
        list(&mut live, LiveIndex::node, vec![node("a", &[], false)]);
        list(&mut live, LiveIndex::image_set, Vec::new());
        let index = live.index();
        assert_eq!(index.node_count(), 1);
        assert!(index.image_availability().is_empty());
        assert!(index.label_counts().is_empty());
    }
}
