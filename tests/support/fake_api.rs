//! A scripted Kubernetes API server for tests: a `kube::Client` over a `tower-test` mock, with
//! helpers to read each request (method, path and query, headers, JSON body) and answer it,
//! including watch streams that stay open.
#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

pub type MockBody = StreamBody<UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;
pub type ApiHandle = Handle<Request<kube::client::Body>, Response<MockBody>>;
pub type WatchSender = UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// How long a test waits for the next request.
pub const WAIT: Duration = Duration::from_secs(20);

/// A client whose requests arrive on the returned handle.
pub fn client(namespace: &str) -> (kube::Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    (kube::Client::new(service, namespace), handle)
}

/// A response whose body stays open: watch events are sent through the returned sender.
pub fn streaming() -> (Response<MockBody>, WatchSender) {
    let (sender, receiver) = unbounded();
    (Response::new(StreamBody::new(receiver)), sender)
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let (mut response, sender) = streaming();
    *response.status_mut() = status;
    let _ = sender.unbounded_send(Ok(Frame::data(Bytes::from(value.to_string()))));
    response
}

/// The API server's answer for a missing object.
pub fn not_found(kind: &str, name: &str) -> Response<MockBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("{kind} {name:?} not found"), "reason": "NotFound", "code": 404,
        }),
    )
}

pub fn send_event(sender: &WatchSender, kind: &str, object: Value) {
    let line = format!("{}\n", json!({"type": kind, "object": object}));
    sender
        .unbounded_send(Ok(Frame::data(Bytes::from(line))))
        .expect("watch still open");
}

/// One request from the client under test.
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub accept: String,
    pub content_type: String,
    pub body: Value,
    pub respond: SendResponse<Response<MockBody>>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.uri
            .split_once('?')
            .map_or(self.uri.as_str(), |(path, _)| path)
    }

    pub fn query(&self) -> &str {
        self.uri.split_once('?').map_or("", |(_, query)| query)
    }

    pub fn is_watch(&self) -> bool {
        self.query().contains("watch=true")
    }
}

pub async fn next_request(handle: &mut ApiHandle) -> Seen {
    let (request, respond) = tokio::time::timeout(WAIT, handle.next_request())
        .await
        .expect("a request within the wait")
        .expect("the client is still running");
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.expect("request body").to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    Seen {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        accept: header(http::header::ACCEPT),
        content_type: header(http::header::CONTENT_TYPE),
        body,
        respond,
    }
}

/// A list response with `resourceVersion` 100, as the watchers' lists get.
pub fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": "100"},
        "items": items,
    })
}

/// The list query of the watchers: whole lists from the API server's cache.
pub fn expected_list_query(field_selector: &str) -> String {
    format!("{field_selector}&resourceVersion=0&resourceVersionMatch=NotOlderThan")
}

/// The watch query that follows a list at resourceVersion 100.
pub fn expected_watch_query(field_selector: &str) -> String {
    format!(
        "&watch=true&timeoutSeconds=290{field_selector}&allowWatchBookmarks=true&resourceVersion=100"
    )
}
