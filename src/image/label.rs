//! The node label that records that an image is present on a node.

use sha2::{Digest, Sha256};

use super::ImageReference;

/// Prefix of every node label Coral manages.
pub const LABEL_PREFIX: &str = "image.coral.dev/";
/// Value of an image label: the image is present on the node.
pub const LABEL_AVAILABLE: &str = "available";
/// Hex digits of the reference hash kept in the label name.
const HASH_HEX_DIGITS: usize = 40;

/// The node label key of an image: `image.coral.dev/` followed by the first 40 hex digits of
/// the SHA-256 of the normalized reference. Label names are limited to 63 characters, which a
/// reference is not, hence the hash.
pub fn label_key(reference: &ImageReference) -> String {
    let digest = Sha256::digest(reference.to_string().as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(LABEL_PREFIX.len() + HASH_HEX_DIGITS);
    key.push_str(LABEL_PREFIX);
    for byte in digest.iter().take(HASH_HEX_DIGITS / 2) {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    key
}

/// Whether a node label key is one of Coral's image labels.
pub fn is_image_label(key: &str) -> bool {
    key.strip_prefix(LABEL_PREFIX).is_some_and(|hash| {
        hash.len() == HASH_HEX_DIGITS
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}
