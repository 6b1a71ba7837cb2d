//! Coral's custom resources and the CRD manifests generated from them.

mod crd;
mod imageset;
mod nodeimage;

pub use crd::{CrdError, crd_files, crd_stream, write_crds};
pub use imageset::{
    FORCE_REMOVE_ANNOTATION, ImageSet, ImageSetImageStatus, ImageSetSpec, ImageSetStatus,
    RetiringImage,
};
pub use nodeimage::{ImageState, NodeImage, NodeImageEntry, NodeImageSpec, NodeImageStatus};

/// API group of Coral's resources.
pub const GROUP: &str = "coral.dev";
/// API version of Coral's resources.
pub const VERSION: &str = "v1alpha1";
