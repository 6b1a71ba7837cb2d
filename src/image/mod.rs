//! Image identity: reference parsing and normalization, and the node label key of an image.

mod label;
mod reference;

pub use label::{LABEL_AVAILABLE, LABEL_PREFIX, is_image_label, label_key};
pub use reference::{
    DEFAULT_REGISTRY, DEFAULT_TAG, ImageReference, ReferenceError, is_digest, unpinned,
};

#[cfg(test)]
mod tests;
