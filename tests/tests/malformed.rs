//! A server facing malformed messages: wrong shapes, huge declared sizes, garbage bytes,
//! wrong models. Each gets an error back, and the server keeps serving everyone else.

use std::process::Command;
use std::time::Duration;

use corolla_tests::{Proc, bin, fixture, temp_dir, wait_for_file_lines};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use shared_model::fingerprint::fingerprint;
use shared_model::loader::ModelFiles;
use shared_model::weights::HostTensor;
use swarm::node::{self, NodeConfig};
use swarm::protocol::{
    ErrorKind, INFERENCE_PROTOCOL, PUSH_MAX_TOKENS, PUSH_PROTOCOL, SessionRequest, SessionResponse, SpanRequest,
    SpanResponse,
};
use swarm::wire::{self, WireDtype, WireTensor};

const MAX: usize = 256 << 20;

fn open(model: &str, batch: u32) -> SessionRequest {
    SessionRequest::Open {
        model: model.into(),
        start: 0,
        end: 4,
        batch,
        max_length: 32,
        pad: vec![0; batch as usize],
        reply_dtype: WireDtype::F32,
        prompts: None,
        adapter: None,
    }
}

fn hidden(shape: Vec<usize>) -> WireTensor {
    let n = shape.iter().product();
    WireTensor::encode(&HostTensor::new(shape, vec![0.01; n]), WireDtype::F32)
}

fn error_kind(r: SessionResponse) -> ErrorKind {
    match r {
        SessionResponse::Error(e) => e.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A relay, one server on `blocks` of fixture `family`, and a client node connected to it.
struct OneServer {
    dir: std::path::PathBuf,
    _relay: Proc,
    _server: Proc,
    relay: Multiaddr,
    server: PeerId,
    model_dir: std::path::PathBuf,
    files: ModelFiles,
    /// The model's fingerprint.
    model: String,
    client: node::Client,
}

async fn one_server(family: &str, blocks: &str) -> OneServer {
    let dir = temp_dir(family);
    let relay_file = dir.join("relay.addrs");
    let relay_proc = Proc::spawn(
        "relay",
        Command::new(bin("relay"))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--addr-file"])
            .arg(&relay_file),
    );
    let relay: Multiaddr = wait_for_file_lines(&relay_file, 1, Duration::from_secs(60))[0]
        .parse()
        .expect("addr");
    let model_dir = fixture(family);
    let server_file = dir.join("server.addrs");
    let server_proc = Proc::spawn(
        "server",
        Command::new(bin("server"))
            .arg("--model")
            .arg(&model_dir)
            .args([
                "--blocks",
                blocks,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--initial-peers",
                &relay.to_string(),
            ])
            .arg("--addr-file")
            .arg(&server_file),
    );
    let server_addr: Multiaddr = wait_for_file_lines(&server_file, 1, Duration::from_secs(60))[0]
        .parse()
        .expect("addr");
    let server = node::peer_of(&server_addr).expect("peer id");
    let files = ModelFiles::open(&model_dir).expect("model");
    let model = fingerprint(&files.config, files.weights.as_ref()).expect("fingerprint");
    let (client, _inbound, event_loop) =
        node::start(NodeConfig::new(libp2p::identity::Keypair::generate_ed25519())).expect("node");
    tokio::spawn(event_loop.run());
    client.dial(server_addr).await.expect("dial server");
    OneServer {
        dir,
        _relay: relay_proc,
        _server: server_proc,
        relay,
        server,
        model_dir,
        files,
        model,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_and_the_server_keeps_serving() {
    let swarm = one_server("llama", "0:4").await;
    let (client, server, model, model_dir, relay) = (
        &swarm.client,
        swarm.server,
        &swarm.model,
        &swarm.model_dir,
        &swarm.relay,
    );

    // Garbage in a well-formed frame: an error, and the session stays usable.
    let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
    s.write_all(&[5, 0, 0, 0, 0xff, 0x13, 0x37, 0x00, 0x42])
        .await
        .expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert_eq!(error_kind(r), ErrorKind::BadRequest);
    // Steps before Open are refused... by closing with an error (the first message must be Open).
    let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
    wire::write_frame(
        &mut s,
        &SessionRequest::Step {
            step: 1,
            hidden: hidden(vec![1, 1, 64]),
            start_from: None,
            push: false,
        },
        MAX,
    )
    .await
    .expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert_eq!(error_kind(r), ErrorKind::BadRequest);

    // A huge declared frame length: refused before anything is allocated.
    let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
    s.write_all(&u32::MAX.to_le_bytes()).await.expect("write");
    s.flush().await.expect("flush");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert_eq!(error_kind(r), ErrorKind::BadRequest);

    // Another checkpoint's fingerprint.
    let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
    wire::write_frame(&mut s, &open("0123456789abcdef", 1), MAX)
        .await
        .expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert_eq!(error_kind(r), ErrorKind::WrongModel);

    // An open session: wrong hidden size, wrong batch, a shape declaring 2^40 elements backed
    // by a few bytes, NaNs. Each is refused and the session goes on.
    let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
    wire::write_frame(&mut s, &open(&model, 1), MAX).await.expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert!(matches!(r, SessionResponse::Opened { .. }), "{r:?}");
    let huge = WireTensor {
        dtype: WireDtype::F32,
        shape: vec![1, 1 << 40, 64],
        bytes: vec![0; 16],
    };
    let mut nan = hidden(vec![1, 1, 64]);
    nan.bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    for bad in [
        hidden(vec![1, 1, 63]),
        hidden(vec![2, 1, 64]),
        huge,
        nan,
        hidden(vec![1, 40, 64]),
    ] {
        wire::write_frame(
            &mut s,
            &SessionRequest::Step {
                step: 1,
                hidden: bad,
                start_from: None,
                push: false,
            },
            MAX,
        )
        .await
        .expect("write");
        let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
        assert_eq!(error_kind(r), ErrorKind::BadRequest);
    }
    wire::write_frame(
        &mut s,
        &SessionRequest::Step {
            step: 7,
            hidden: hidden(vec![1, 3, 64]),
            start_from: None,
            push: false,
        },
        MAX,
    )
    .await
    .expect("write");
    match wire::read_frame::<_, SessionResponse>(&mut s, MAX)
        .await
        .expect("answer")
    {
        SessionResponse::Output { step, hidden, .. } => {
            assert_eq!(step, 7);
            assert_eq!(hidden.shape, vec![1, 3, 64]);
        }
        other => panic!("expected output, got {other:?}"),
    }
    // The stream closes mid-frame: the server just ends that session.
    s.write_all(&[100, 0, 0, 0, 1, 2]).await.expect("write");
    s.close().await.expect("close");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;

    // Stateless requests with bad shapes or spans.
    let bad_span = SpanRequest::Forward {
        model: model.clone(),
        start: 0,
        end: 9,
        pad: vec![0],
        hidden: hidden(vec![1, 2, 64]),
        reply_dtype: WireDtype::F32,
        prompts: None,
    };
    match client.span_request(server, bad_span).await.expect("answer") {
        SpanResponse::Error(e) => assert_eq!(e.kind, ErrorKind::WrongSpan),
        other => panic!("expected an error, got {other:?}"),
    }
    let bad_pad = SpanRequest::Forward {
        model: model.clone(),
        start: 0,
        end: 4,
        pad: vec![0, 0, 0],
        hidden: hidden(vec![1, 2, 64]),
        reply_dtype: WireDtype::F32,
        prompts: None,
    };
    match client.span_request(server, bad_pad).await.expect("answer") {
        SpanResponse::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest),
        other => panic!("expected an error, got {other:?}"),
    }

    // After all that, a real client still gets the golden tokens.
    let out = Command::new(bin("corolla"))
        .arg("generate")
        .arg("--model")
        .arg(&model_dir)
        .args([
            "--token-ids",
            "359,310,172,47,105,300,235,357,169,40,181,303",
            "--max-new-tokens",
            "10",
            "--ignore-eos",
            "--json",
        ])
        .args(["--initial-peers", &relay.to_string()])
        .output()
        .expect("corolla runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        json["token_ids"],
        serde_json::json!([105, 30, 105, 187, 176, 30, 105, 187, 176, 30])
    );
}

/// The stateless span protocol computes what a local run computes: forward outputs and the
/// input gradient for a given output gradient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_forward_and_backward_match_local() {
    use burn::prelude::*;
    use shared_model::model::{BlockSpan, to_host};
    use shared_model::{Cpu, CpuAutodiff};

    let swarm = one_server("mixtral", "1:4").await;
    let (client, server, model, files) = (&swarm.client, swarm.server, &swarm.model, &swarm.files);

    let (b, t, h) = (2, 5, 64);
    let x = HostTensor::new(
        vec![b, t, h],
        (0..b * t * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect(),
    );
    let g = HostTensor::new(
        vec![b, t, h],
        (0..b * t * h).map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0).collect(),
    );
    let pad = vec![0u32, 2];
    let request = |backward: bool| {
        if backward {
            SpanRequest::Backward {
                model: model.clone(),
                start: 2,
                end: 4,
                pad: pad.clone(),
                hidden: WireTensor::encode(&x, WireDtype::F32),
                grad_output: WireTensor::encode(&g, WireDtype::F32),
                reply_dtype: WireDtype::F32,
                prompts: None,
            }
        } else {
            SpanRequest::Forward {
                model: model.clone(),
                start: 2,
                end: 4,
                pad: pad.clone(),
                hidden: WireTensor::encode(&x, WireDtype::F32),
                reply_dtype: WireDtype::F32,
                prompts: None,
            }
        }
    };
    let remote = |r: SpanResponse| match r {
        SpanResponse::Tensor(t) => t.decode(&Default::default()).expect("valid tensor"),
        SpanResponse::Error(e) => panic!("server refused: {e}"),
        other => panic!("unexpected answer {other:?}"),
    };
    let forward = remote(client.span_request(server, request(false)).await.expect("answer"));
    let backward = remote(client.span_request(server, request(true)).await.expect("answer"));

    let device = Default::default();
    let pads: Vec<usize> = pad.iter().map(|&p| p as usize).collect();
    let span = BlockSpan::<Cpu>::load(&files.config, files.weights.as_ref(), 2..4, &device).expect("span");
    let xt = Tensor::<Cpu, 3>::from_data(TensorData::new(x.data.clone(), x.shape.clone()), &device);
    let local_forward = to_host(span.forward_full(xt, pads.clone()).expect("forward"));
    let span = BlockSpan::<CpuAutodiff>::load(&files.config, files.weights.as_ref(), 2..4, &device).expect("span");
    let xa =
        Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(x.data.clone(), x.shape.clone()), &device).require_grad();
    let ga = Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(g.data.clone(), g.shape.clone()), &device);
    let y = span.forward_full(xa.clone(), pads).expect("forward");
    let grads = (y * ga).sum().backward();
    let local_backward = to_host(xa.grad(&grads).expect("gradient"));
    for (what, a, e) in [
        ("forward", &forward, &local_forward),
        ("backward", &backward, &local_backward),
    ] {
        assert_eq!(a.shape, e.shape, "{what}");
        let scale = e.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .data
            .iter()
            .zip(&e.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5 * scale.max(1.0), "{what}: {worst:e} (scale {scale:e})");
    }
}

/// One session step through `s`: its output, or the error's kind.
async fn step(
    s: &mut libp2p::Stream,
    step: u64,
    hidden: WireTensor,
    start_from: Option<u64>,
) -> Result<Vec<f32>, ErrorKind> {
    wire::write_frame(
        s,
        &SessionRequest::Step {
            step,
            hidden,
            start_from,
            push: false,
        },
        MAX,
    )
    .await
    .expect("write");
    match wire::read_frame::<_, SessionResponse>(s, MAX).await.expect("answer") {
        SessionResponse::Output { hidden, .. } => Ok(hidden
            .decode(&swarm::protocol::Limits::default())
            .expect("decodes")
            .data),
        SessionResponse::Error(e) => Err(e.kind),
        other => panic!("expected output, got {other:?}"),
    }
}

fn ramp(positions: usize, from: f32) -> WireTensor {
    let n = positions * 64;
    let data = (0..n).map(|i| from + 0.001 * i as f32).collect();
    WireTensor::encode(&HostTensor::new(vec![1, positions, 64], data), WireDtype::F32)
}

/// `Step::start_from` (speculative decoding's rollback): positions past it are forgotten, so
/// the step after a rollback equals the same step in a session that never saw them; rolling
/// forward is refused and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_forgets_rejected_positions_and_refuses_rolling_forward() {
    let swarm = one_server("llama", "0:4").await;
    let (client, server, model) = (&swarm.client, swarm.server, &swarm.model);
    let session = || async {
        let mut s = client.open_stream(server, INFERENCE_PROTOCOL).await.expect("stream");
        wire::write_frame(&mut s, &open(model, 1), MAX).await.expect("write");
        let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
        assert!(matches!(r, SessionResponse::Opened { .. }), "{r:?}");
        s
    };
    let mut fresh = session().await;
    step(&mut fresh, 0, ramp(3, 0.1), None).await.expect("prefix");
    let expected = step(&mut fresh, 1, ramp(2, -0.3), None).await.expect("next");

    let mut rolled = session().await;
    step(&mut rolled, 0, ramp(3, 0.1), None).await.expect("prefix");
    let rejected = step(&mut rolled, 1, ramp(4, 0.7), None).await.expect("drafts");
    assert_eq!(
        step(&mut rolled, 2, ramp(2, -0.3), Some(8)).await,
        Err(ErrorKind::BadRequest),
        "7 positions held: 8 is past them"
    );
    let got = step(&mut rolled, 3, ramp(2, -0.3), Some(3))
        .await
        .expect("after the rollback");
    assert_eq!(
        got, expected,
        "a rolled-back session equals one that never saw the drafts"
    );
    assert_ne!(rejected[..64], expected[..64]);
    // Rolling back to the very start, then the same prefix: the same output again.
    let again = step(&mut rolled, 4, ramp(3, 0.1), Some(0)).await.expect("from 0");
    let mut other = session().await;
    assert_eq!(again, step(&mut other, 0, ramp(3, 0.1), None).await.expect("prefix"));
}

/// A node of its own (its own peer id) connected to the server.
async fn other_node(server: &OneServer) -> node::Client {
    let (client, _inbound, event_loop) =
        node::start(NodeConfig::new(libp2p::identity::Keypair::generate_ed25519())).expect("node");
    tokio::spawn(event_loop.run());
    let addr = std::fs::read_to_string(server.dir.join("server.addrs")).expect("server addrs");
    let addr: Multiaddr = addr.lines().next().expect("an address").parse().expect("addr");
    client.dial(addr).await.expect("dial server");
    client
}

async fn linked_session(
    s: &OneServer,
    token: u64,
    from: Option<PeerId>,
    to: Option<swarm::protocol::PushTarget>,
) -> (libp2p::Stream, SessionResponse) {
    let mut st = s
        .client
        .open_stream(s.server, INFERENCE_PROTOCOL)
        .await
        .expect("stream");
    wire::write_frame(&mut st, &open(&s.model, 1), MAX)
        .await
        .expect("write");
    let r: SessionResponse = wire::read_frame(&mut st, MAX).await.expect("answer");
    assert!(matches!(r, SessionResponse::Opened { .. }), "{r:?}");
    let link = SessionRequest::Link {
        token,
        from: from.map(|p| p.to_string()),
        to,
    };
    wire::write_frame(&mut st, &link, MAX).await.expect("write");
    let r: SessionResponse = wire::read_frame(&mut st, MAX).await.expect("answer");
    (st, r)
}

/// Sends one push; the write may fail when the server has already dropped the stream (as it
/// does for a peer no session expects).
async fn push(
    from: &node::Client,
    server: PeerId,
    token: u64,
    position: u64,
    hidden: WireTensor,
) -> (Option<libp2p::Stream>, Result<(), wire::WireError>) {
    let Ok(mut p) = from.open_stream(server, PUSH_PROTOCOL).await else {
        return (None, Ok(()));
    };
    let step = swarm::protocol::PushStep {
        token,
        position,
        start_from: None,
        hidden,
    };
    let written = wire::write_frame(&mut p, &step, MAX).await;
    (Some(p), written)
}

/// Server-to-server push among hostile peers: a session takes pushes only from the peer its
/// client named, for its own token, at its own position; it pushes only where its client said,
/// never to itself; pushed steps compute what the client's own steps do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_come_only_from_and_go_only_to_the_peers_the_client_named() {
    let swarm = one_server("llama", "0:4").await;
    let (named, stranger) = (other_node(&swarm).await, other_node(&swarm).await);
    let server = swarm.server;

    // The reference: the same two steps sent by the client itself.
    let (mut plain, r) = linked_session(&swarm, 1, None, None).await;
    assert_eq!(r, SessionResponse::Linked);
    let first = step(&mut plain, 1, ramp(3, 0.1), None).await.expect("prefix");
    let second = step(&mut plain, 2, ramp(1, -0.2), None).await.expect("decode");

    let (mut s, r) = linked_session(&swarm, 77, Some(named.peer_id()), None).await;
    assert_eq!(r, SessionResponse::Linked);
    // A token another session holds is refused.
    let (_, r) = linked_session(&swarm, 77, None, None).await;
    assert_eq!(error_kind(r), ErrorKind::BadRequest, "a taken token");
    // A stranger's push (right token) is dropped: nothing reaches the session...
    let _ignored = push(&stranger, server, 77, 0, ramp(3, 0.1)).await;
    // ... nor a push of the named peer for another session's token.
    let _wrong = push(&named, server, 1, 0, ramp(3, 0.1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The client's own step comes next on its stream: nothing was computed before it.
    assert_eq!(step(&mut s, 1, ramp(3, 0.1), None).await.expect("prefix"), first);
    // The named peer's push at the session's position runs, answered on the client's stream.
    let (_stream, written) = push(&named, server, 77, 3, ramp(1, -0.2)).await;
    written.expect("the named peer's push goes through");
    let r: SessionResponse = tokio::time::timeout(Duration::from_secs(20), wire::read_frame(&mut s, MAX))
        .await
        .expect("in time")
        .expect("answer");
    match r {
        SessionResponse::Pushed {
            position,
            hidden,
            pushed,
        } => {
            assert_eq!(position, 3);
            assert!(!pushed, "no next hop was named");
            let got = hidden
                .decode(&swarm::protocol::Limits::default())
                .expect("decodes")
                .data;
            assert_eq!(got, second, "a pushed step computes what the client's does");
        }
        other => panic!("expected the pushed step's output, got {other:?}"),
    }
    // A push for a position the session is past (the client sent that step itself) is dropped.
    let _stale = push(&named, server, 77, 3, ramp(1, -0.2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = step(&mut s, 3, ramp(1, 0.3), None).await.expect("next");
    assert_eq!(third, step(&mut plain, 3, ramp(1, 0.3), None).await.expect("next"));

    // Pushing to its own server, a non-peer-id target, or a step too long to push: refused.
    let own = swarm::protocol::PushTarget {
        peer: server.to_string(),
        addrs: vec![],
        token: 5,
    };
    let (_, r) = linked_session(&swarm, 90, None, Some(own)).await;
    assert_eq!(error_kind(r), ErrorKind::BadRequest, "push to itself");
    let bogus = swarm::protocol::PushTarget {
        peer: "not a peer".into(),
        addrs: vec![],
        token: 5,
    };
    let (_, r) = linked_session(&swarm, 91, None, Some(bogus)).await;
    assert_eq!(error_kind(r), ErrorKind::BadRequest, "not a peer id");

    // The session pushes where its client said, and only there.
    let mut arrivals = named.accept(PUSH_PROTOCOL).expect("accept pushes");
    let target = swarm::protocol::PushTarget {
        peer: named.peer_id().to_string(),
        addrs: vec![],
        token: 4242,
    };
    let (mut s, r) = linked_session(&swarm, 92, None, Some(target)).await;
    assert_eq!(r, SessionResponse::Linked);
    let long = SessionRequest::Step {
        step: 1,
        hidden: ramp(PUSH_MAX_TOKENS + 1, 0.1),
        start_from: None,
        push: true,
    };
    wire::write_frame(&mut s, &long, MAX).await.expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    assert_eq!(error_kind(r), ErrorKind::BadRequest, "too long to push");
    let short = SessionRequest::Step {
        step: 2,
        hidden: ramp(3, 0.1),
        start_from: None,
        push: true,
    };
    wire::write_frame(&mut s, &short, MAX).await.expect("write");
    let r: SessionResponse = wire::read_frame(&mut s, MAX).await.expect("answer");
    let out = match r {
        SessionResponse::Output {
            step: 2,
            hidden,
            pushed,
        } => {
            assert!(pushed, "the named peer was reachable");
            hidden
        }
        other => panic!("expected the output, got {other:?}"),
    };
    use futures::StreamExt;
    let (from, mut stream) = tokio::time::timeout(Duration::from_secs(20), arrivals.next())
        .await
        .expect("in time")
        .expect("a push stream");
    assert_eq!(from, server);
    let pushed: swarm::protocol::PushStep = wire::read_frame(&mut stream, MAX).await.expect("pushed step");
    assert_eq!(pushed.token, 4242);
    assert_eq!(pushed.position, 0);
    assert_eq!(pushed.hidden, out, "the next hop gets what the client gets");
}
