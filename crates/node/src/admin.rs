//! The admin HTTP/JSON API, Prometheus metrics and a small dashboard.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sharedlog::queue::QueueId;

use crate::daemon::{Node, Task};

#[derive(Serialize)]
struct ApiError {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ApiError { error: message.into() })).into_response()
}

fn not_ready() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "the catalog is not open yet (the shared log may have no leader)")
}

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/hosts", get(hosts))
        .route("/api/v1/log", get(log_status))
        .route("/api/v1/tasks", get(list_tasks).post(add_task))
        .route("/api/v1/tasks/{id}", delete(remove_task))
        .route("/api/v1/placement", axum::routing::post(place))
        .route("/api/v1/objects", get(list_objects).post(create_object))
        .route("/api/v1/objects/{name}", get(show_object).delete(remove_object))
        .route("/api/v1/volumes", get(list_volumes).post(create_volume))
        .route("/api/v1/volumes/{name}", delete(remove_volume))
        .route("/api/v1/volumes/{name}/grow", axum::routing::post(grow_volume))
        .route("/api/v1/targets", get(list_targets).post(create_target))
        .route("/api/v1/targets/balance", axum::routing::post(balance_targets))
        .route("/api/v1/targets/{name}", delete(remove_target))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see /api/v1/status") })
        .with_state(node)
}

async fn status(State(node): State<Arc<Node>>) -> Response {
    Json(node.cluster_status().await).into_response()
}

async fn hosts(State(node): State<Arc<Node>>) -> Response {
    let Some(services) = node.services() else {
        return not_ready();
    };
    match services.catalog.hosts().await {
        Ok(hosts) => Json(hosts.into_iter().map(|(record, _)| record).collect::<Vec<_>>()).into_response(),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

async fn log_status(State(node): State<Arc<Node>>) -> Response {
    match &node.log_server {
        Some(server) => Json(server.status()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("host {} holds no log replica", node.config.node_id)),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.render_metrics()).into_response()
}

#[derive(Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub position: u64,
    pub kind: String,
    pub detail: String,
    pub created_by: u64,
}

#[derive(Serialize, Deserialize)]
pub struct NewTask {
    pub kind: String,
    #[serde(default)]
    pub detail: String,
}

async fn list_tasks(State(node): State<Arc<Node>>) -> Response {
    let Some(services) = node.services() else {
        return not_ready();
    };
    match services.tasks.items().await {
        Ok(items) => Json(
            items
                .into_iter()
                .map(|(id, position, task)| TaskView {
                    id: id.to_string(),
                    position,
                    kind: task.kind,
                    detail: task.detail,
                    created_by: task.created_by,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

async fn add_task(
    State(node): State<Arc<Node>>,
    body: Result<Json<NewTask>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if new.kind.is_empty() || new.kind.len() > 256 || new.detail.len() > 64 * 1024 {
        return error(StatusCode::BAD_REQUEST, "kind must be 1-256 bytes and detail at most 64 KiB");
    }
    let Some(services) = node.services() else {
        return not_ready();
    };
    let task = Task { kind: new.kind, detail: new.detail, created_by: node.config.node_id };
    match services.tasks.enqueue(task.clone()).await {
        Ok((id, position)) => (
            StatusCode::CREATED,
            Json(TaskView {
                id: id.to_string(),
                position,
                kind: task.kind,
                detail: task.detail,
                created_by: task.created_by,
            }),
        )
            .into_response(),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

#[derive(Serialize)]
struct Removed {
    removed: bool,
}

async fn remove_task(State(node): State<Arc<Node>>, Path(id): Path<String>) -> Response {
    let id: QueueId = match id.parse() {
        Ok(id) => id,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(services) = node.services() else {
        return not_ready();
    };
    match services.tasks.remove(id).await {
        Ok(true) => Json(Removed { removed: true }).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no task {id}")),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

/// A placement request as the API takes it.
#[derive(Serialize, Deserialize)]
pub struct PlacementRequest {
    pub count: usize,
    pub bytes: u64,
    #[serde(default)]
    pub distinct_hosts: bool,
    #[serde(default)]
    pub distinct_fault_domains: bool,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub excluded_hosts: Vec<u64>,
}

async fn place(
    State(node): State<Arc<Node>>,
    body: Result<Json<PlacementRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(asked) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if asked.count == 0 || asked.count > 64 {
        return error(StatusCode::BAD_REQUEST, "count must be 1 to 64");
    }
    let request = placement::Request {
        id: 0,
        count: asked.count,
        bytes: asked.bytes,
        distinct_hosts: asked.distinct_hosts,
        distinct_fault_domains: asked.distinct_fault_domains,
        site: asked.site,
        excluded_hosts: asked.excluded_hosts.into_iter().collect(),
    };
    match crate::membership::place(&node, request).await {
        Ok(chosen) => Json(chosen).into_response(),
        Err(message) => error(StatusCode::CONFLICT, message),
    }
}

/// A new object as the API takes it.
#[derive(Serialize, Deserialize)]
pub struct NewObject {
    pub name: String,
    /// `none`, `raid1:2` or `raid1:3`.
    pub policy: String,
    pub size_bytes: u64,
    /// Encrypted at rest, with a key of its own.
    #[serde(default)]
    pub encrypted: bool,
}

async fn list_objects(State(node): State<Arc<Node>>) -> Response {
    if node.services().is_none() {
        return not_ready();
    }
    Json(crate::storage::object_statuses(&node).await).into_response()
}

async fn show_object(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Response {
    let Some(services) = node.services() else {
        return not_ready();
    };
    match services.catalog.objects.get(&name).await {
        Ok(Some((record, _))) => {
            let stats = crate::storage::gather_stats(&node, std::slice::from_ref(&record)).await;
            Json(crate::storage::object_status(&record, stats.get(&name))).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no object named {name:?}")),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

async fn create_object(
    State(node): State<Arc<Node>>,
    body: Result<Json<NewObject>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let policy = match catalog::Policy::parse(&new.policy) {
        Ok(policy) => policy,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    use crate::storage::CreateError;
    match crate::storage::create(&node, &new.name, policy, new.size_bytes, new.encrypted).await {
        Ok(record) => (StatusCode::CREATED, Json(crate::storage::object_status(&record, None))).into_response(),
        Err(failure @ CreateError::Invalid(_)) => error(StatusCode::BAD_REQUEST, failure.to_string()),
        Err(failure @ CreateError::Exists(_)) => error(StatusCode::CONFLICT, failure.to_string()),
        Err(failure @ CreateError::Unavailable(_)) => error(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
    }
}

#[derive(Serialize, Deserialize)]
pub struct RemovedObject {
    pub removed: String,
    /// Components that could not be deleted now (their host is away).
    pub leftovers: Vec<String>,
}

async fn remove_object(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Response {
    match crate::storage::remove(&node, &name).await {
        Ok(Some((_, leftovers))) => Json(RemovedObject { removed: name, leftovers }).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no object named {name:?}")),
        Err(failure) => error(StatusCode::SERVICE_UNAVAILABLE, failure),
    }
}

fn volume_error(failure: crate::targets::VolumeOpError) -> Response {
    use crate::targets::VolumeOpError;
    let status = match &failure {
        VolumeOpError::Invalid(_) => StatusCode::BAD_REQUEST,
        VolumeOpError::NotFound(_) => StatusCode::NOT_FOUND,
        VolumeOpError::Exists(_) => StatusCode::CONFLICT,
        VolumeOpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, failure.to_string())
}

async fn list_volumes(State(node): State<Arc<Node>>) -> Response {
    if node.services().is_none() {
        return not_ready();
    }
    Json(crate::targets::volume_statuses(&node)).into_response()
}

async fn create_volume(
    State(node): State<Arc<Node>>,
    body: Result<Json<crate::targets::NewVolume>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    match crate::targets::create_volume(&node, &new).await {
        Ok(record) => (StatusCode::CREATED, Json(record)).into_response(),
        Err(failure) => volume_error(failure),
    }
}

#[derive(Serialize, Deserialize)]
pub struct Grow {
    pub size_bytes: u64,
}

async fn grow_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<Grow>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(grow) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    match crate::targets::grow_volume(&node, &name, grow.size_bytes).await {
        Ok(record) => Json(record).into_response(),
        Err(failure) => volume_error(failure),
    }
}

async fn remove_volume(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Response {
    match crate::targets::remove_volume(&node, &name).await {
        Ok(record) => Json(record).into_response(),
        Err(failure) => volume_error(failure),
    }
}

async fn list_targets(State(node): State<Arc<Node>>) -> Response {
    if node.services().is_none() {
        return not_ready();
    }
    Json(crate::targets::target_statuses(&node)).into_response()
}

async fn create_target(
    State(node): State<Arc<Node>>,
    body: Result<Json<crate::targets::NewTarget>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    match crate::targets::create_target(&node, &new).await {
        Ok(_) => {
            let status = crate::targets::target_statuses(&node).into_iter().find(|target| target.name == new.name);
            (StatusCode::CREATED, Json(status)).into_response()
        }
        Err(failure) => volume_error(failure),
    }
}

async fn balance_targets(State(node): State<Arc<Node>>) -> Response {
    match crate::targets::rebalance(&node, true).await {
        Ok(moves) => Json(moves).into_response(),
        Err(failure) => volume_error(failure),
    }
}

async fn remove_target(State(node): State<Arc<Node>>, Path(name): Path<String>) -> Response {
    match crate::targets::remove_target(&node, &name).await {
        Ok(record) => Json(record).into_response(),
        Err(failure) => volume_error(failure),
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}
