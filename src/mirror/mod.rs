//! Mirroring images into a registry: a pure plan (the mapping rule from a source reference to
//! its mirror reference, the platforms kept, what a copy moves) in [`plan`], apart from the
//! registry I/O in [`copy`]; the mirror worker's state and decisions in [`book`].

pub mod book;
pub mod copy;
pub mod plan;

pub use copy::{Copied, Copier, DEFAULT_BLOB_CONCURRENCY, MirrorError};
pub use plan::{MirrorTarget, PlanError, Platform, is_loopback, mirror_reference};

#[cfg(test)]
mod tests;
