//! The swarm on an emulated WAN (bench/wan): relay, servers and client each in a network
//! namespace of their own, every link with a real delay and bandwidth cap. Needs root, as
//! the emulator does.

use std::process::Command;
use std::time::Duration;

use corolla_tests::{Proc, Swarm, Wan, bin, csv, fixture, golden_rows, temp_dir, token_ids, wait_for_file_lines};

fn f64_at(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what}: {v}"))
}

/// Measures TCP from inside the namespaces, independently of the emulator's own check: the
/// connect time (one round trip) and the goodput of a 3-second bulk transfer.
const TCP_PROBE: &str = r#"
import socket, sys, time
role, host = sys.argv[1], sys.argv[2]
if role == "sink":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 5001)); s.listen(8)
    while True:
        c, _ = s.accept()
        first, total, marks = None, 0, []
        while True:
            b = c.recv(1 << 20)
            if not b: break
            now = time.time(); first = first or now; total += len(b); marks.append((now, total))
        if total > 1000000:
            # Skip the first 40% (slow start), report the rest's rate.
            t1, n1 = next(m for m in marks if m[0] >= first + 0.4 * (now - first))
            print((total - n1) * 8 / (now - t1) / 1e6, flush=True)
            break
else:
    rtts = []
    for _ in range(5):
        t = time.time(); c = socket.create_connection((host, 5001)); rtts.append((time.time() - t) * 1e3); c.close()
    print(sorted(rtts)[2], flush=True)
    c = socket.create_connection((host, 5001)); end = time.time() + 3; buf = b"x" * 65536
    while time.time() < end: c.sendall(buf)
    c.close()
"#;

/// The emulator's links do what was asked: its self-check (UDP echo and a paced UDP flood)
/// and an independent TCP measurement agree with the asked RTT and bandwidth, including a
/// link set apart from the others.
#[test]
fn the_emulator_measures_what_it_was_asked() {
    let wan = Wan::start(
        "wan-check",
        3,
        &["--rtt-ms", "40", "--mbit", "50", "--link", "0-2=120,20"],
    );
    let check = &wan.ready["check"];
    assert_eq!(check["ok"], true, "{}", wan.log());
    let rtts = check["rtt"].as_array().expect("rtt");
    assert_eq!(rtts.len(), 3, "every pair: {check}");
    for r in rtts {
        let pair = (r["from"].as_u64(), r["to"].as_u64());
        let asked = if pair == (Some(0), Some(2)) { 120.0 } else { 40.0 };
        assert_eq!(f64_at(&r["asked_ms"], "asked"), asked, "{r}");
        let measured = f64_at(&r["median_ms"], "median");
        assert!((measured - asked).abs() <= asked * 0.05, "{r}");
    }
    for r in check["rate"].as_array().expect("rate") {
        let asked = if r["from"] == 2 { 20.0 } else { 50.0 };
        let measured = f64_at(&r["measured_mbit"], "rate");
        assert!((measured / asked - 1.0).abs() <= 0.05, "{r}");
    }

    let dir = temp_dir("wan-check-tcp");
    let script = dir.join("tcp_probe.py");
    std::fs::write(&script, TCP_PROBE).expect("write the probe");
    let sink = Proc::spawn(
        "tcp-sink",
        wan.command(1, "python3").arg(&script).args(["sink", wan.addr(1)]),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = wan
        .command(0, "python3")
        .arg(&script)
        .args(["source", wan.addr(1)])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let connect_ms: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("connect time");
    assert!(
        (connect_ms - 40.0).abs() <= 2.0,
        "TCP connect took {connect_ms} ms over a 40 ms link"
    );
    let printed = wait_for_file_lines(sink.log_path(), 1, Duration::from_secs(10));
    let goodput: f64 = printed[0]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("sink printed {printed:?}"));
    // TCP carries 1448 payload bytes in each 1500-byte packet of the cap.
    let wire_share = 1448.0 / 1500.0;
    assert!(
        goodput > 50.0 * wire_share * 0.93 && goodput < 50.0 * 1.01,
        "TCP goodput {goodput} Mbit/s over a 50 Mbit/s link"
    );
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// At 50 ms RTT, three servers in a chain: the client-driven chain (`--no-push`), push, and
/// push with speculative decoding all give the golden tokens. A decode token costs what each
/// path's round trips say: at least 2n one-way delays without push, at least n + 1 with it,
/// and below 2n (which only servers passing outputs to each other can do).
#[test]
fn push_over_a_50ms_wan_gives_the_golden_tokens_in_n_plus_1_delays() {
    let model = fixture("llama");
    let wan = Wan::start("wan-golden", 5, &["--rtt-ms", "50", "--mbit", "100"]);
    let mut swarm = Swarm::start_on("wan-golden", wan);
    for blocks in ["0:2", "2:3", "3:4"] {
        swarm.server(&model, blocks, &[]);
    }
    let (hops, one_way) = (3.0, 25.0);
    let (inputs, generated) = golden_rows("llama");
    for (row, prompt) in inputs.iter().enumerate() {
        let new = (generated[row].len() - prompt.len()).to_string();
        let expected = &generated[row][prompt.len()..];
        let prompt = csv(prompt);
        for mode in ["client", "push", "push+spec"] {
            let mut args = vec!["--token-ids", &prompt, "--max-new-tokens", &new, "--ignore-eos"];
            match mode {
                "client" => args.push("--no-push"),
                "push+spec" => args.extend(["--speculative", "4"]),
                _ => {}
            }
            let (out, log) = swarm.generate(&model, &args);
            assert_eq!(token_ids(&out), expected, "row {row} {mode}: {log}");
            if mode == "push+spec" {
                continue;
            }
            // The median token: the first decode step also links the route and opens pushes.
            let token_ms: Vec<f64> = out["timing"]["token_ms"]
                .as_array()
                .expect("token_ms")
                .iter()
                .skip(1)
                .map(|t| f64_at(t, "token_ms"))
                .collect();
            let ms = median(token_ms);
            let client_floor = 2.0 * hops * one_way;
            if mode == "client" {
                assert!(
                    ms >= client_floor * 0.95,
                    "row {row}: {ms} ms a token without push, under {client_floor}"
                );
            } else {
                let push_floor = (hops + 1.0) * one_way;
                assert!(
                    ms >= push_floor * 0.95 && ms < client_floor * 0.95,
                    "row {row}: {ms} ms a token with push: expected {push_floor}..{client_floor}: {log}"
                );
            }
        }
    }
}

/// At 50 ms RTT with push, the middle server of a three-server route dies by kill -9
/// mid-generation; the client takes over from the hop that did not answer, fails over to
/// another server of those blocks and the tokens are the undisturbed ones.
#[test]
fn kill9_of_a_middle_server_with_push_gives_the_undisturbed_tokens() {
    let model = fixture("llama");
    let wan = Wan::start("wan-failover", 6, &["--rtt-ms", "50", "--mbit", "100"]);
    let mut swarm = Swarm::start_on("wan-failover", wan);
    swarm.server(&model, "0:2", &[]);
    let a = swarm.server(&model, "2:3", &[]);
    let b = swarm.server(&model, "2:3", &[]);
    swarm.server(&model, "3:4", &[]);
    let args = ["--token-ids", "1,2,3,4,5", "--max-new-tokens", "30", "--ignore-eos"];
    let undisturbed = {
        let out = Command::new(bin("corolla"))
            .arg("generate")
            .arg("--model")
            .arg(&model)
            .args(args)
            .arg("--json")
            .output()
            .expect("corolla runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        token_ids(&v)
    };
    let (tokens, log) = swarm.generate_through_a_kill(&model, &args, 5, |_, route| {
        let i = [&a, &b]
            .into_iter()
            .position(|peer| route.contains(peer.as_str()))
            .expect("the route uses one of the 2:3 servers");
        i + 1
    });
    assert!(log.contains("route linked for pushes"), "tokens went by push: {log}");
    assert_eq!(tokens, undisturbed);
}
