//! HTTP for what clients fetch outside libp2p (the page, the relay's bootstrap addresses, the
//! servers' client bundles, the OpenAI-compatible API), on hyper, axum and tower-http, with the
//! limits a server open to the internet needs: a deadline on reading a request's head (slow
//! clients cannot hold a connection), bounded heads and bodies, a cap on connections, a
//! deadline on every handler, CORS for pages of other origins, and files streamed from disk
//! with range requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::cors::{Any, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

/// What one HTTP listener allows.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time to send a request's head, from the connection's start or the last response.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_head_bytes: usize,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a handler may take to start its response (a streamed body may then take longer).
    pub handler_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 16 * 1024,
            max_connections: 1024,
            handler_timeout: Duration::from_secs(30),
        }
    }
}

/// The headers every answer carries: any page may fetch (reading only), nothing is sniffed.
pub fn public(router: Router, limits: &HttpLimits) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD, Method::OPTIONS, Method::POST])
        .allow_headers(Any)
        .expose_headers([
            header::CONTENT_LENGTH,
            header::ETAG,
            header::ACCEPT_RANGES,
            header::CONTENT_RANGE,
        ]);
    router
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.handler_timeout,
        ))
        .layer(cors)
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("cross-origin"),
        ))
}

/// A folder's files (the built page): streamed from disk, `index.html` for `/`, never a path
/// outside it; compressed for clients that take gzip.
pub fn static_files(root: &Path) -> Router {
    let files = tower_http::services::ServeDir::new(root)
        .append_index_html_on_directories(true)
        .precompressed_gzip();
    Router::new()
        .fallback_service(files)
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        // The page names its assets by content hash, except the page itself, which must not go
        // stale; a short cache for the rest.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        ))
}

/// Serves `router` on `listener` until the task is dropped, within `limits`.
pub async fn serve(listener: TcpListener, router: Router, limits: HttpLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let service = hyper_util::service::TowerToHyperService::new(router);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// A plain-text error answer.
pub fn error(status: axum::http::StatusCode, message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, format!("{message}\n")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn fetch(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_files_without_escaping_the_root_and_drops_slow_clients() {
        let dir = std::env::temp_dir().join(format!("corolla-http-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("temp dir");
        std::fs::write(dir.join("index.html"), "<p>hi</p>").expect("write");
        std::fs::write(dir.join("sub/a.wasm"), [0u8, 97, 115, 109]).expect("write");
        std::fs::write(dir.join("../corolla-http-secret"), "secret").expect("write");
        let limits = HttpLimits {
            header_read_timeout: Duration::from_millis(500),
            ..HttpLimits::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, public(static_files(&dir), &limits), limits));

        let close = "Connection: close\r\n\r\n";
        let ok = fetch(addr, &format!("GET / HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase().contains("access-control-allow-origin: *"),
            "{ok}"
        );
        assert!(ok.ends_with("<p>hi</p>"), "{ok}");
        let wasm = fetch(addr, &format!("GET /sub/a.wasm HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(wasm.contains("application/wasm"), "{wasm}");
        let range = fetch(
            addr,
            &format!("GET /index.html HTTP/1.1\r\nHost: x\r\nRange: bytes=3-4\r\n{close}"),
        )
        .await;
        assert!(range.starts_with("HTTP/1.1 206") && range.ends_with("hi"), "{range}");
        let head = fetch(addr, &format!("HEAD /index.html HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(
            head.contains("content-length: 9") && !head.ends_with("<p>hi</p>"),
            "{head}"
        );
        for escape in [
            "/../corolla-http-secret",
            "/sub/../../corolla-http-secret",
            "/%2e%2e/corolla-http-secret",
        ] {
            let out = fetch(addr, &format!("GET {escape} HTTP/1.1\r\nHost: x\r\n{close}")).await;
            assert!(
                !out.contains("secret") || out.starts_with("HTTP/1.1 4"),
                "{escape}: {out}"
            );
        }
        assert!(fetch(addr, "garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n{close}",
            "a".repeat(64 * 1024)
        );
        assert!(
            fetch(addr, &huge).await.starts_with("HTTP/1.1 431"),
            "an oversized head"
        );

        // A client that never finishes its head is cut off; others are served meanwhile.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        let ok = fetch(addr, &format!("GET / HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let mut rest = Vec::new();
        let cut = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
        assert!(cut.is_ok(), "a slow client kept its connection");
        let _ = std::fs::remove_file(dir.join("../corolla-http-secret"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
