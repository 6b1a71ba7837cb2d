//! Pinning images on containerd, so that the kubelet's image garbage collection leaves them
//! alone. The CRI has no call to pin an image; containerd reports an image as pinned (CRI
//! `Image.pinned`, which the kubelet's garbage collection skips) when it carries the label
//! `io.cri-containerd.pinned=pinned`, which its own images service sets. The agent speaks to
//! that service on the same socket, in the CRI's namespace `k8s.io`. A runtime without it
//! (CRI-O) answers `Unimplemented`, and the agent stops trying.

use std::collections::HashMap;

use tonic::transport::Channel;

/// The label containerd reads as "pinned".
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
const PINNED_VALUE: &str = "pinned";
/// The namespace of the images the CRI plugin manages.
const CRI_NAMESPACE: &str = "k8s.io";
const UPDATE_PATH: &str = "/containerd.services.images.v1.Images/Update";

/// `containerd.services.images.v1.Image`, the fields an update of labels needs.
#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(map = "string, string", tag = "2")]
    labels: HashMap<String, String>,
}

/// `google.protobuf.FieldMask`.
#[derive(Clone, PartialEq, prost::Message)]
struct FieldMask {
    #[prost(string, repeated, tag = "1")]
    paths: Vec<String>,
}

/// `containerd.services.images.v1.UpdateImageRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct UpdateImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<Image>,
    #[prost(message, optional, tag = "2")]
    update_mask: Option<FieldMask>,
}

/// `containerd.services.images.v1.UpdateImageResponse` (its image is not read).
#[derive(Clone, PartialEq, prost::Message)]
struct UpdateImageResponse {}

/// What pinning an image came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// The runtime has no containerd images service (CRI-O): pinning is not possible.
    Unsupported,
    /// The runtime has no image of that name.
    NotFound,
    Failed(String),
}

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported => f.write_str("the runtime has no containerd images service"),
            Self::NotFound => f.write_str("no such image"),
            Self::Failed(message) => f.write_str(message),
        }
    }
}

/// A client of containerd's images service.
#[derive(Debug, Clone)]
pub struct Pinner {
    channel: Channel,
}

impl Pinner {
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// Sets (`pinned`) or removes the pinned label of the image named `name` (as containerd
    /// names it: the normalized reference).
    pub async fn set(&self, name: &str, pinned: bool) -> Result<(), PinError> {
        let labels = if pinned {
            HashMap::from([(PINNED_LABEL.to_string(), PINNED_VALUE.to_string())])
        } else {
            HashMap::new()
        };
        let request = UpdateImageRequest {
            image: Some(Image {
                name: name.to_string(),
                labels,
            }),
            update_mask: Some(FieldMask {
                paths: vec![format!("labels.{PINNED_LABEL}")],
            }),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(std::time::Duration::from_secs(30));
        if let Ok(namespace) = CRI_NAMESPACE.parse() {
            request
                .metadata_mut()
                .insert("containerd-namespace", namespace);
        }
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| PinError::Failed(format!("the runtime is not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<UpdateImageRequest, UpdateImageResponse>::default();
        let path = http::uri::PathAndQuery::from_static(UPDATE_PATH);
        match grpc.unary(request, path, codec).await {
            Ok(_) => Ok(()),
            Err(status) => Err(match status.code() {
                tonic::Code::Unimplemented => PinError::Unsupported,
                tonic::Code::NotFound => PinError::NotFound,
                _ => PinError::Failed(format!(
                    "containerd Images.Update failed ({:?}): {}",
                    status.code(),
                    status.message()
                )),
            }),
        }
    }
}
