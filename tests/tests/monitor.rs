//! The swarm monitor: the relay's `/corolla/v1/state` matches the servers started (model,
//! spans, names, versions, coverage, health), and turns broken when the only server of some
//! blocks dies (kill -9).

use std::time::Duration;

use corolla_tests::{Swarm, fixture, free_port, wait_for_state as wait_for};

#[test]
fn the_state_follows_the_servers_and_breaks_when_a_span_dies() {
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut swarm = Swarm::start_with("monitor", &["--http-listen", &http]);
    let model = fixture("llama");
    let first = swarm.server(&model, "0:2", &["--public-name", "first"]);
    let second = swarm.server(&model, "2:4", &["--public-name", "second"]);

    let healthy = wait_for(port, Duration::from_secs(30), "both servers listed", |s| {
        s["models"][0]["servers"].as_array().is_some_and(|a| a.len() == 2) && s["models"][0]["healthy"] == true
    });
    let m = &healthy["models"][0];
    assert_eq!(m["num_blocks"], 4);
    assert_eq!(m["num_blocks_known"], true);
    assert_eq!(m["uncovered"], serde_json::json!([]));
    let coverage: Vec<u64> = m["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| b["servers"].as_u64().expect("count"))
        .collect();
    assert_eq!(coverage, [1, 1, 1, 1]);
    assert!(m["blocks"][0]["throughput"].as_f64().is_some_and(|t| t > 0.0));
    let servers = m["servers"].as_array().expect("servers");
    for (s, (peer, name, span)) in servers
        .iter()
        .zip([(&first, "first", (0, 2)), (&second, "second", (2, 4))])
    {
        assert_eq!(s["peer_id"], peer.as_str());
        assert_eq!(s["name"], name);
        assert_eq!((s["start"].as_u64(), s["end"].as_u64()), (Some(span.0), Some(span.1)));
        assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(s["state"], "online");
        assert_eq!(s["relayed"], false);
        assert!(s["throughput"].as_f64().is_some_and(|t| t > 0.0));
    }
    assert!(m["name"].as_str().is_some_and(|n| !n.is_empty()));

    // The only server of blocks 2..4 dies: the model is broken at once, not when its record
    // expires.
    swarm.servers[1].0.kill9();
    let broken = wait_for(port, Duration::from_secs(15), "the model broken", |s| {
        s["models"][0]["healthy"] == false
    });
    let m = &broken["models"][0];
    assert_eq!(m["uncovered"], serde_json::json!([[2, 4]]), "{broken:#}");
    let dead = m["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["peer_id"] == second.as_str())
        .expect("the dead server is still listed while its record lives");
    assert_eq!(dead["state"], "unreachable");
}
