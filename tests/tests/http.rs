//! The HTTP listeners (relay's page and bootstrap, `corolla api`) against hostile clients on
//! 127.0.0.1: 500 slowloris connections that never finish their request head do not stop
//! either from answering others, and are cut off; oversized heads and bodies are refused.

use std::process::Command;
use std::time::{Duration, Instant};

use corolla_tests::{Proc, STARTUP, bin, smollm2, temp_dir, wait_for_file_lines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW_CLIENTS: usize = 500;

/// One request on its own connection: the status line and the whole answer, in `limit`.
async fn fetch(addr: &str, request: &str, limit: Duration) -> Result<String, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// Writes `request` while reading the answer: a server may answer (and hang up) before it has
/// read a body it refuses; what it sent before the reset still counts.
async fn send_all_and_read(addr: &str, request: Vec<u8>, limit: Duration) -> String {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, read.read_to_end(&mut out)).await;
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_oversized_requests_do_not_stop_the_page_or_the_api() {
    let dir = temp_dir("http");
    let web = dir.join("web");
    std::fs::create_dir_all(&web).expect("web root");
    std::fs::write(web.join("index.html"), "<p>corolla</p>").expect("index");
    let relay_port = corolla_tests::free_port();
    let _relay = Proc::spawn(
        "relay",
        Command::new(bin("relay"))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
            .arg(dir.join("relay.addrs"))
            .args(["--http-listen", &format!("127.0.0.1:{relay_port}"), "--web-root"])
            .arg(&web),
    );
    wait_for_file_lines(&dir.join("relay.addrs"), 1, STARTUP);
    let api_file = dir.join("api.addr");
    let _api = Proc::spawn(
        "api",
        Command::new(bin("corolla"))
            .args(["api", "--listen", "127.0.0.1:0", "--model"])
            .arg(smollm2())
            .arg("--addr-file")
            .arg(&api_file),
    );
    let api = wait_for_file_lines(&api_file, 1, STARTUP).remove(0);
    let relay = format!("127.0.0.1:{relay_port}");
    let quick = Duration::from_secs(3);
    for (addr, path) in [(&relay, "/"), (&relay, "/corolla/v1/bootstrap.json"), (&api, "/health")] {
        let answer = fetch(addr, &get(path), quick).await.expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }

    // Slowloris: connections that send part of a head and then a byte now and then.
    let mut slow = Vec::new();
    for i in 0..SLOW_CLIENTS {
        let addr = if i % 2 == 0 { &relay } else { &api };
        let mut s = TcpStream::connect(addr.as_str()).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        slow.push(s);
    }
    let started = Instant::now();
    for round in 0..3 {
        for s in &mut slow {
            let _ = s.write_all(b"X").await;
        }
        for (addr, path) in [
            (&relay, "/"),
            (&relay, "/corolla/v1/bootstrap.json"),
            (&api, "/health"),
            (&api, "/v1/models"),
        ] {
            let answer = fetch(addr, &get(path), quick)
                .await
                .unwrap_or_else(|e| panic!("round {round}, {path} under slowloris: {e}"));
            assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Cut off once their time to send a head (10 s) is up.
    let mut cut = 0;
    for s in &mut slow {
        let mut buf = Vec::new();
        let left = Duration::from_secs(15).saturating_sub(started.elapsed());
        if let Ok(Ok(_)) = tokio::time::timeout(left.max(Duration::from_millis(10)), s.read_to_end(&mut buf)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, SLOW_CLIENTS, "slow clients still connected after 15 s");

    // Oversized heads and bodies.
    let huge_head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    for addr in [&relay, &api] {
        let answer = send_all_and_read(addr, huge_head.clone().into_bytes(), quick).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{addr}: {answer}");
    }
    let body = "x".repeat(9 << 20);
    let post = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = send_all_and_read(&api, post.into_bytes(), Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
}
