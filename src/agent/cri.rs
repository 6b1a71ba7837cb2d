//! A client of the container runtime's image and runtime services (CRI v1) over its unix socket.
//!
//! The channel connects lazily and reconnects by itself: when the runtime restarts, the next
//! call dials the socket again. Callers retry failed calls with backoff.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListContainersRequest,
    ListImagesRequest, PullImageRequest, RemoveImageRequest, VersionRequest,
};
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Default socket of containerd; CRI-O's is `unix:///var/run/crio/crio.sock`.
pub const DEFAULT_CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";

/// Time allowed to dial the socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for calls other than pulls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed CRI call.
#[derive(Debug, Clone, Error)]
#[error("CRI {operation} failed ({}): {message}", code_label(*.code))]
pub struct CriError {
    pub operation: &'static str,
    pub code: tonic::Code,
    pub message: String,
}

impl CriError {
    fn new(operation: &'static str, status: tonic::Status) -> Self {
        Self {
            operation,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The gRPC code as a metric label (a bounded set).
    pub fn metric_label(&self) -> &'static str {
        code_label(self.code)
    }

    /// Whether the runtime itself could not be reached (rather than refusing the call).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// A socket address that is not a unix socket.
#[derive(Debug, Clone, Error)]
#[error("--cri-socket {0:?}: expected unix:///path/to/socket or an absolute path")]
pub struct SocketError(String);

/// The runtime's name and versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    pub runtime_name: String,
    pub runtime_version: String,
    pub api_version: String,
}

/// An image the runtime holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeImage {
    /// Image ID (the config digest).
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
}

impl From<k8s_cri::v1::Image> for RuntimeImage {
    fn from(image: k8s_cri::v1::Image) -> Self {
        Self {
            id: image.id,
            repo_tags: image.repo_tags,
            repo_digests: image.repo_digests,
            size: image.size,
        }
    }
}

/// A client of one runtime. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Cri {
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
    channel: Channel,
    socket: PathBuf,
}

/// The path of a `unix://` socket address.
pub fn socket_path(address: &str) -> Result<PathBuf, SocketError> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if !path.starts_with('/') {
        return Err(SocketError(address.to_string()));
    }
    Ok(PathBuf::from(path))
}

impl Cri {
    /// A client of the runtime at `address`; nothing is dialed until the first call. Call it
    /// inside a Tokio runtime (the channel's worker is spawned on it).
    pub fn new(address: &str) -> Result<Self, SocketError> {
        let socket = socket_path(address)?;
        let path = socket.clone();
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }));
        Ok(Self {
            images: ImageServiceClient::new(channel.clone()),
            runtime: RuntimeServiceClient::new(channel.clone()),
            channel,
            socket,
        })
    }

    /// The channel to the runtime's socket (containerd serves more than the CRI on it).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The runtime service, for calls the agent does not make itself (tests run pod
    /// sandboxes and containers through it).
    pub fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The socket this client dials.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        request
    }

    /// `RuntimeService.Version`.
    pub async fn version(&self) -> Result<RuntimeVersion, CriError> {
        let response = self
            .runtime
            .clone()
            .version(Self::request(VersionRequest {
                version: "v1".to_string(),
            }))
            .await
            .map_err(|s| CriError::new("Version", s))?
            .into_inner();
        Ok(RuntimeVersion {
            runtime_name: response.runtime_name,
            runtime_version: response.runtime_version,
            api_version: response.runtime_api_version,
        })
    }

    /// `ImageService.ListImages`.
    pub async fn list_images(&self) -> Result<Vec<RuntimeImage>, CriError> {
        let response = self
            .images
            .clone()
            .list_images(Self::request(ListImagesRequest { filter: None }))
            .await
            .map_err(|s| CriError::new("ListImages", s))?
            .into_inner();
        Ok(response.images.into_iter().map(Into::into).collect())
    }

    /// `ImageService.ImageStatus`: `None` when the runtime does not hold the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, CriError> {
        let response = self
            .images
            .clone()
            .image_status(Self::request(ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            }))
            .await
            .map_err(|s| CriError::new("ImageStatus", s))?
            .into_inner();
        Ok(response.image.map(Into::into))
    }

    /// `ImageService.PullImage`; returns the image reference the runtime reports (its ID).
    /// Pulls have no deadline of their own: large images take what they take.
    pub async fn pull(&self, image: &str, auth: Option<AuthConfig>) -> Result<String, CriError> {
        let response = self
            .images
            .clone()
            .pull_image(tonic::Request::new(PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config: None,
            }))
            .await
            .map_err(|s| CriError::new("PullImage", s))?
            .into_inner();
        Ok(response.image_ref)
    }

    /// `ImageService.RemoveImage`.
    pub async fn remove(&self, image: &str) -> Result<(), CriError> {
        self.images
            .clone()
            .remove_image(Self::request(RemoveImageRequest {
                image: Some(image_spec(image)),
            }))
            .await
            .map_err(|s| CriError::new("RemoveImage", s))?;
        Ok(())
    }

    /// `ImageService.ImageFsInfo`: bytes used on the image filesystems.
    pub async fn image_fs_used_bytes(&self) -> Result<u64, CriError> {
        let response = self
            .images
            .clone()
            .image_fs_info(Self::request(ImageFsInfoRequest {}))
            .await
            .map_err(|s| CriError::new("ImageFsInfo", s))?
            .into_inner();
        Ok(response
            .image_filesystems
            .iter()
            .filter_map(|fs| fs.used_bytes.as_ref().map(|u| u.value))
            .sum())
    }

    /// `RuntimeService.ListContainers`: image IDs and references used by any container.
    pub async fn images_in_use(&self) -> Result<Vec<String>, CriError> {
        let response = self
            .runtime
            .clone()
            .list_containers(Self::request(ListContainersRequest { filter: None }))
            .await
            .map_err(|s| CriError::new("ListContainers", s))?
            .into_inner();
        let mut used = Vec::new();
        for container in response.containers {
            used.push(container.image_ref);
            if let Some(spec) = container.image {
                used.push(spec.image);
            }
        }
        Ok(used)
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..ImageSpec::default()
    }
}
