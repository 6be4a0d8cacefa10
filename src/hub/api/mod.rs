//! The service side of the hub: the IoT Hub REST API (api-version 2021-04-12) over HTTPS.
//!
//! `serve` accepts TLS connections and runs each through hyper with the axum router built in
//! `router`. Handlers live by resource: `devices` (registry and statistics), `twins` (twins
//! and direct methods), `query` (`POST /devices/query`), `jobs` (`/jobs/v2`), `events` (the
//! simdevice extension that reads recent telemetry), `certificates` (the simdevice extension
//! for X.509 CA and device certificates). Every handler names the permission it
//! needs in its signature (`authorized::Authorized<P>`, an extractor that checks the
//! api-version and the caller's SAS token before the handler runs).
//!
//! A path that is no operation of the API answers 400 with 400004 ArgumentInvalid: the status
//! and the code agree (the code list has no generic "no such resource" 404 code), and a 4xx is
//! never retried by the SDKs.

mod authorized;
mod certificates;
mod devices;
mod dps;
mod error;
mod events;
mod faults;
mod jobs;
mod query;
mod twins;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

pub use error::ApiError;

use super::accept::{AcceptLoop, Alive};
use super::faults::Listener;
use super::HubState;

type AppState = State<Arc<HubState>>;

/// Time a client has to finish its TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/devices", get(devices::list).post(devices::bulk))
        .route(
            "/devices/{id}",
            get(devices::get_one)
                .put(devices::create_or_update)
                .delete(devices::delete),
        )
        .route("/statistics/devices", get(devices::statistics))
        .route("/statistics/service", get(devices::service_statistics))
        .route(
            "/twins/{id}",
            get(twins::get_twin)
                .patch(twins::update)
                .put(twins::replace),
        )
        .route("/twins/{id}/methods", post(twins::invoke_method))
        .route("/devices/query", post(query::run))
        .route("/jobs/v2/query", get(jobs::query))
        .route("/jobs/v2/{id}", get(jobs::get_one).put(jobs::create))
        .route("/jobs/v2/{id}/cancel", post(jobs::cancel))
        // The DPS service API (`dps`): enrollments of the local DPS.
        .route(
            "/enrollmentGroups/{id}",
            get(dps::get_group)
                .put(dps::put_group)
                .delete(dps::delete_group),
        )
        .route("/enrollmentGroups/query", post(dps::query_groups))
        .route(
            "/enrollments/{id}",
            get(dps::get_individual)
                .put(dps::put_individual)
                .delete(dps::delete_individual),
        )
        .route("/enrollments/query", post(dps::query_individuals))
        .route("/simdevice/events", get(events::list))
        .route("/simdevice/faults", get(faults::get).post(faults::set))
        .route(
            "/simdevice/devices/{id}/messages/devicebound",
            post(events::send_cloud_to_device),
        )
        .route("/simdevice/certificates", get(certificates::list))
        .route(
            "/simdevice/certificates/{name}",
            get(certificates::get_one)
                .put(certificates::add)
                .delete(certificates::delete),
        )
        .route(
            "/simdevice/certificates/{name}/generate",
            post(certificates::generate),
        )
        .route("/simdevice/device-certificates", post(certificates::issue))
        .fallback(|| async {
            ApiError::bad_request("no such operation in the IoT Hub service API")
        })
        .with_state(state)
}

/// A JSON request body as handlers receive it: parsed, or axum's reason why not.
type JsonBody<T> = Result<axum::Json<T>, axum::extract::rejection::JsonRejection>;

/// The parsed body, or a 400 whose message says which body (`what`) and why.
fn json_body<T>(body: JsonBody<T>, what: &str) -> Result<T, ApiError> {
    body.map(|axum::Json(body)| body)
        .map_err(|e| ApiError::bad_request(format!("{what}: {}", e.body_text())))
}

fn if_match(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("if-match")
        .and_then(|v: &HeaderValue| v.to_str().ok())
}

/// Service connections open at the same time. A permit is held for a connection's whole
/// life: the API's clients are a few service SDKs and scripts, and every connection ends
/// within [`HANDSHAKE_DEADLINE`] (TLS) or [`HEADER_READ_TIMEOUT`] of silence (hyper also arms
/// it while a keep-alive connection waits for its next request). When all are taken, a new
/// socket is closed at once, before TLS: the client sees a reset and retries, as it would
/// against a busy IoT Hub front end; nothing queues.
pub const MAX_API_CONNECTIONS: usize = 256;

/// Time a client has to send a request's head, and the longest a keep-alive connection idles.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
) {
    let accept = AcceptLoop {
        name: "API",
        max_pending: MAX_API_CONNECTIONS,
        shutdown: shutdown.clone(),
        tasks,
        alive,
        kill: state.faults.accept_loop_kill(Listener::Api),
    };
    let app = router(state);
    accept
        .run(listener, move |socket, peer, permit| {
            serve_connection(
                socket,
                peer,
                permit,
                acceptor.clone(),
                app.clone(),
                shutdown.clone(),
            )
        })
        .await;
}

/// One HTTPS connection, from TLS handshake to close; `_permit` goes back when it ends.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "API TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service = hyper::service::service_fn(move |request| app.clone().call(request));
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}
