//! The real `relay` binary on 127.0.0.1: addresses, persistent identity, start-up errors.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corolla_tests::{Proc, bin, temp_dir, wait_for_file_lines};

const STARTUP: Duration = Duration::from_secs(30);

fn start_relay(name: &str, dir: &Path) -> Proc {
    Proc::spawn(
        name,
        Command::new(bin("relay"))
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
            ])
            .arg("--identity")
            .arg(dir.join("relay.key"))
            .arg("--addr-file")
            .arg(dir.join("relay.addrs")),
    )
}

/// Checks the address file holds one TCP and one QUIC address on loopback, both naming the
/// same peer, and returns that peer id.
fn check_addrs(lines: &[String]) -> String {
    assert_eq!(lines.len(), 2, "expected exactly a TCP and a QUIC address: {lines:?}");
    let peer_ids: Vec<&str> = lines
        .iter()
        .map(|l| {
            l.rsplit_once("/p2p/")
                .unwrap_or_else(|| panic!("address without /p2p/: {l}"))
                .1
        })
        .collect();
    assert_eq!(peer_ids[0], peer_ids[1], "addresses name different peers: {lines:?}");
    assert!(
        peer_ids[0].starts_with("12D3KooW"),
        "not an ed25519 peer id: {}",
        peer_ids[0]
    );
    assert!(lines.iter().all(|l| l.starts_with("/ip4/127.0.0.1/")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("/tcp/") && !l.contains("/tcp/0/")),
        "no bound TCP address: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("/udp/") && l.contains("/quic-v1/")),
        "no QUIC address: {lines:?}"
    );
    peer_ids[0].to_string()
}

#[test]
fn relay_advertises_addresses_and_keeps_its_identity() {
    let dir = temp_dir("relay-identity");
    let addr_file = dir.join("relay.addrs");

    let mut relay = start_relay("relay-1", &dir);
    let first = check_addrs(&wait_for_file_lines(&addr_file, 2, STARTUP));
    assert!(dir.join("relay.key").is_file(), "identity file not created");
    relay.kill9();

    std::fs::remove_file(&addr_file).expect("remove address file");
    let mut relay = start_relay("relay-2", &dir);
    let second = check_addrs(&wait_for_file_lines(&addr_file, 2, STARTUP));
    assert_eq!(
        first, second,
        "peer id changed across restarts with the same --identity"
    );

    // SIGTERM is how service managers stop it: it must exit cleanly and promptly.
    relay.terminate();
    let status = relay
        .wait_timeout(Duration::from_secs(10))
        .expect("relay did not exit on SIGTERM");
    assert!(
        status.success(),
        "relay exited with {status} on SIGTERM:\n{}",
        relay.log()
    );
}

/// Runs the relay expecting a start-up failure; returns its (stdout + stderr) output.
fn expect_startup_error(name: &str, args: &[&str]) -> String {
    let mut relay = Proc::spawn(name, Command::new(bin("relay")).args(args).env("COROLLA_LOG", "off"));
    let status = relay
        .wait_timeout(STARTUP)
        .expect("relay kept running despite a bad argument");
    assert!(
        !status.success(),
        "relay exited successfully with bad arguments {args:?}"
    );
    relay.log()
}

#[test]
fn bad_listen_address_is_a_one_line_error() {
    let output = expect_startup_error("relay-bad-listen", &["--listen", "not-a-multiaddr"]);
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{output}");
    assert!(
        lines[0].contains("--listen") && lines[0].contains("not-a-multiaddr"),
        "{output}"
    );
}

#[test]
fn unsupported_listen_address_is_a_one_line_error() {
    // Parses as a multiaddr, but no transport can listen on bare UDP.
    let output = expect_startup_error("relay-udp-listen", &["--listen", "/ip4/127.0.0.1/udp/0"]);
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{output}");
    assert!(lines[0].contains("/ip4/127.0.0.1/udp/0"), "{output}");
}
