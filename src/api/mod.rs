//! Coral's custom resources and the CRD manifests generated from them.

mod crd;
mod imageset;
mod nodeimage;
mod registry;

pub use crd::{CrdError, crd_files, crd_stream, write_crds};
pub use imageset::{
    FORCE_REMOVE_ANNOTATION, ImageMirrorStatus, ImageSet, ImageSetImageStatus, ImageSetMirror,
    ImageSetSpec, ImageSetStatus, MirrorState, RetiringImage,
};
pub use nodeimage::{
    ImageRemoval, ImageState, NodeImage, NodeImageEntry, NodeImageSpec, NodeImageStatus,
    UnwantedImage,
};
pub use registry::{Registry, RegistrySpec, RegistryStatus, RegistryTls, RetiringCopy, SecretKey};

/// API group of Coral's resources.
pub const GROUP: &str = "coral.dev";
/// API version of Coral's resources.
pub const VERSION: &str = "v1alpha1";
