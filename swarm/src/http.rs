//! A small HTTP/1.1 server for what browsers fetch outside libp2p: the page itself, the
//! relay's bootstrap addresses and the servers' client bundles. GET, HEAD and CORS preflight
//! only; one request per connection. Requests are size-capped and never trusted for paths.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD_BYTES: usize = 16 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request line.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
}

/// What a handler answers.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub cache_control: String,
    pub etag: Option<String>,
    pub body: Arc<Vec<u8>>,
}

impl HttpResponse {
    pub fn ok(content_type: &str, body: Arc<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type: content_type.into(),
            cache_control: "no-cache".into(),
            etag: None,
            body,
        }
    }

    pub fn json(value: &serde_json::Value) -> Self {
        Self::ok("application/json", Arc::new(value.to_string().into_bytes()))
    }

    pub fn error(status: u16, message: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8".into(),
            cache_control: "no-store".into(),
            etag: None,
            body: Arc::new(format!("{message}\n").into_bytes()),
        }
    }

    /// Content addressed by its digest never changes: browsers may keep it for good.
    pub fn immutable(mut self, etag: &str) -> Self {
        self.cache_control = "public, max-age=31536000, immutable".into();
        self.etag = Some(format!("\"{etag}\""));
        self
    }
}

pub type Handler = Arc<dyn Fn(&HttpRequest) -> HttpResponse + Send + Sync>;

/// Serves `handler` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, handler).await {
                tracing::debug!(%peer, error = %e, "HTTP connection failed");
            }
        });
    }
}

async fn serve_connection(mut stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD_BYTES {
                return Ok(false);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    let request = if complete { parse_request(&head) } else { None };
    let (response, send_body) = match &request {
        None => (HttpResponse::error(400, "bad request"), true),
        Some(r) if r.method == "OPTIONS" => (HttpResponse::ok("text/plain", Arc::new(Vec::new())), false),
        Some(r) if r.method == "GET" || r.method == "HEAD" => (handler(r), r.method == "GET"),
        Some(_) => (HttpResponse::error(405, "only GET, HEAD and OPTIONS"), true),
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: {}\r\n\
         Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n\
         Access-Control-Allow-Headers: *\r\nAccess-Control-Expose-Headers: Content-Length, ETag\r\n\
         Cross-Origin-Resource-Policy: cross-origin\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        response.cache_control,
    );
    if let Some(etag) = &response.etag {
        out.push_str(&format!("ETag: {etag}\r\n"));
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes()).await?;
    if send_body {
        stream.write_all(&response.body).await?;
    }
    stream.shutdown().await
}

fn parse_request(head: &[u8]) -> Option<HttpRequest> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    if !parts.next()?.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    Some(HttpRequest { method, path })
}

/// Static files under a root folder (the built page), read once at start-up.
#[derive(Debug, Clone, Default)]
pub struct StaticFiles {
    files: BTreeMap<String, (String, Arc<Vec<u8>>)>,
}

impl StaticFiles {
    /// Reads every file under `root` (the page is a few files, a few MB).
    pub fn load(root: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Some(rel) = relative_url(root, &path) else {
                    continue;
                };
                let body = Arc::new(std::fs::read(&path)?);
                files.insert(rel, (content_type(&path).to_string(), body));
            }
        }
        Ok(Self { files })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The file at a URL path (`/` is `/index.html`).
    pub fn get(&self, path: &str) -> Option<HttpResponse> {
        let path = if path == "/" { "/index.html" } else { path };
        let (content_type, body) = self.files.get(path)?;
        let mut response = HttpResponse::ok(content_type, body.clone());
        // Trunk puts a content hash in every asset name except the page itself.
        if !path.ends_with(".html") {
            response.cache_control = "public, max-age=3600".into();
        }
        Some(response)
    }
}

fn relative_url(root: &Path, path: &Path) -> Option<String> {
    let rel: PathBuf = path.strip_prefix(root).ok()?.to_path_buf();
    let mut url = String::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => {
                url.push('/');
                url.push_str(s.to_str()?);
            }
            _ => return None,
        }
    }
    Some(url)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        let r = parse_request(b"GET /a/b?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").expect("valid");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/a/b"));
        assert!(parse_request(b"GET a HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_request(b"GET /a\r\n\r\n").is_none());
        assert!(parse_request(b"\xff\xfe\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn serves_files_without_escaping_the_root() {
        let dir = std::env::temp_dir().join(format!("corolla-http-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("temp dir");
        std::fs::write(dir.join("index.html"), "<p>hi</p>").expect("write");
        std::fs::write(dir.join("sub/a.wasm"), [0u8, 97, 115, 109]).expect("write");
        let files = StaticFiles::load(&dir).expect("load");
        assert_eq!(files.get("/").expect("index").body.as_slice(), b"<p>hi</p>");
        assert_eq!(files.get("/sub/a.wasm").expect("wasm").content_type, "application/wasm");
        assert!(files.get("/../etc/passwd").is_none());
        assert!(files.get("/sub/../index.html").is_none());

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler: Handler = Arc::new(move |r: &HttpRequest| {
            files
                .get(&r.path)
                .unwrap_or_else(|| HttpResponse::error(404, "not found"))
        });
        tokio::spawn(serve(listener, handler));
        let fetch = |request: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(request.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        let ok = fetch("GET /index.html HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("Access-Control-Allow-Origin: *"));
        assert!(ok.ends_with("<p>hi</p>"));
        let head = fetch("HEAD /index.html HTTP/1.1\r\n\r\n").await;
        assert!(head.contains("Content-Length: 9") && !head.ends_with("<p>hi</p>"));
        assert!(fetch("GET /nope HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(fetch("POST / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(fetch("garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
