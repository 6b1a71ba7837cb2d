//! A scripted Kubernetes API server over plain HTTP for end-to-end runs of the real `coral`
//! binary: lists answered from fixed JSON, watches left open (nothing changes), single objects
//! from a map (404 otherwise), and every write recorded and answered with the object it names.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A write the server received.
#[derive(Debug, Clone)]
pub struct Write {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Clone, Default)]
struct Script {
    /// Path -> list JSON.
    lists: Arc<BTreeMap<String, Value>>,
    /// Path -> object JSON, for reads.
    objects: Arc<BTreeMap<String, Value>>,
    /// Path (without `/status`) -> the object answered to writes.
    answers: Arc<BTreeMap<String, Value>>,
    writes: Arc<Mutex<Vec<Write>>>,
}

pub struct ApiServer {
    pub url: String,
    writes: Arc<Mutex<Vec<Write>>>,
    _dir: tempfile::TempDir,
    pub kubeconfig: std::path::PathBuf,
}

/// A kubeconfig for the API server at `url` (token auth, namespace coral-system).
pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
         clusters: [{{name: t, cluster: {{server: \"{url}\"}}}}]\n\
         users: [{{name: t, user: {{token: t}}}}]\n\
         contexts: [{{name: t, context: {{cluster: t, user: t, namespace: coral-system}}}}]\n"
    )
}

/// A list response.
pub fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn answer(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn handle(State(script): State<Script>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let uri = request.uri().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if method == Method::GET {
        if query.contains("watch=true") {
            // Nothing changes: the watch stays open.
            return Response::new(Body::from_stream(futures::stream::pending::<
                Result<Vec<u8>, std::io::Error>,
            >()));
        }
        if let Some(list) = script.lists.get(&path) {
            return answer(StatusCode::OK, list);
        }
        if let Some(object) = script.objects.get(&path) {
            return answer(StatusCode::OK, object);
        }
        return answer(
            StatusCode::NOT_FOUND,
            &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
        );
    }
    let bytes = to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    script.writes.lock().unwrap().push(Write {
        method: method.to_string(),
        uri,
        content_type,
        body: body.clone(),
    });
    let target = path.trim_end_matches("/status");
    match script
        .answers
        .get(target)
        .or_else(|| script.objects.get(target))
    {
        Some(object) => answer(StatusCode::OK, object),
        None if body.get("kind").is_some() => answer(StatusCode::CREATED, &body),
        None => answer(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
        ),
    }
}

impl ApiServer {
    /// Serves on a free port of 127.0.0.1 from the runtime in scope, and writes a kubeconfig
    /// for it.
    pub async fn start(
        lists: BTreeMap<String, Value>,
        objects: BTreeMap<String, Value>,
        answers: BTreeMap<String, Value>,
    ) -> Self {
        let script = Script {
            lists: Arc::new(lists),
            objects: Arc::new(objects),
            answers: Arc::new(answers),
            writes: Arc::default(),
        };
        let writes = script.writes.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, Router::new().fallback(handle).with_state(script))
                .await
                .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_for(&url)).unwrap();
        Self {
            url,
            writes,
            _dir: dir,
            kubeconfig,
        }
    }

    /// The real `coral` binary as a command pointed at this server (and at no in-cluster
    /// one); the caller adds the arguments.
    pub fn coral(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_coral"));
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBERNETES_SERVICE_HOST", "");
        command
    }

    /// The writes received so far.
    pub fn writes(&self) -> Vec<Write> {
        self.writes.lock().unwrap().clone()
    }
}
