//! Private swarms: a pre-shared key that outsiders lack.
//!
//! A private swarm's peers share a 32-byte key in the IPFS `swarm.key` format
//! (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits). It guards three things:
//!
//! - **Connections.** Every byte stream libp2p carries (TCP, and relay circuits end to end) is
//!   encrypted with libp2p `pnet` under the key before Noise even starts, so a peer without it
//!   cannot finish a handshake. QUIC and WebRTC bring their own encryption and cannot be
//!   wrapped: nodes turn QUIC off, and keep WebRTC-direct (the browsers' transport) behind a
//!   [`Gate`]: a peer connected only that way is [`Standing::Pending`] until it proves it holds
//!   the key over [`AUTH_PROTOCOL`], and is disconnected if it has not within
//!   [`AUTH_TIMEOUT`]; meanwhile a node answers none of its requests and holds its streams.
//! - **Records.** DHT keys are replaced by an HMAC of them under the key (a key's owning peer
//!   id stays visible, so stores still check ownership), and values are sealed with
//!   XChaCha20-Poly1305, the key as associated data. A peer that reaches the DHT (a browser
//!   in the seconds before the gate drops it) reads nothing and finds no models.
//! - **Proofs** ([`AUTH_PROTOCOL`]): both sides send a fresh nonce and answer with an HMAC of
//!   both nonces and both peer ids, which the transport's own handshake has authenticated, so
//!   an answer proves the key and is good for no other connection.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use hmac::{Hmac, Mac};
use libp2p::core::ConnectedPoint;
use libp2p::kad::RecordKey;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use rand::TryRngCore;
use sha2::Sha256;
use tokio::sync::watch;

use crate::dht_store::key_owner;
use crate::rt::Instant;

/// The proof-of-key protocol, spoken on connections `pnet` cannot protect.
pub const AUTH_PROTOCOL: StreamProtocol = StreamProtocol::new("/corolla/auth/1");

/// How long a node waits for a WebRTC peer's proof before it disconnects it.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
const SEAL_NONCE_BYTES: usize = 24;
/// Sealed DHT keys: `corolla/p/<hmac>` (or `.../<owner peer id>`).
const SEALED_KEY_PREFIX: &str = "corolla/p/";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum SwarmKeyError {
    #[error("cannot read the swarm key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "{path} is not a swarm key: expected the IPFS swarm.key format (`/key/swarm/psk/1.0.0/`, \
         `/base16/`, then 64 hex digits), {reason}"
    )]
    Format { path: String, reason: String },
}

/// Why a record cannot be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no randomness for the record's nonce: {0}")]
    Random(std::io::Error),
    #[error("the record is too large to seal")]
    TooLarge,
}

/// Why a proof of the swarm key failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("proof of the swarm key: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer does not hold this swarm's key")]
    WrongKey,
    #[error("the peer sent no proof of the swarm key within {0:?}")]
    Timeout(Duration),
}

/// A private swarm's key, with the keys derived from it for each use.
#[derive(Clone)]
pub struct SwarmKey {
    psk: PreSharedKey,
    names: [u8; 32],
    seal: [u8; 32],
    auth: [u8; 32],
}

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: only go-libp2p's fingerprint of it.
        write!(f, "SwarmKey({})", self.psk.fingerprint())
    }
}

impl SwarmKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let derive = |label: &str| -> [u8; 32] {
            let mut mac = hmac(&bytes);
            mac.update(b"corolla/swarm-key/");
            mac.update(label.as_bytes());
            mac.finalize().into_bytes().into()
        };
        Self {
            psk: PreSharedKey::new(bytes),
            names: derive("dht-names"),
            seal: derive("dht-values"),
            auth: derive("auth"),
        }
    }

    /// Parses a key file's text.
    pub fn parse(text: &str, path: &str) -> Result<Self, SwarmKeyError> {
        let format = |reason: &str| SwarmKeyError::Format {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let [kind, encoding, hex] = lines[..] else {
            return Err(format(&format!("found {} non-empty lines, not 3", lines.len())));
        };
        if kind != "/key/swarm/psk/1.0.0/" {
            return Err(format(&format!("the first line is `{kind}`")));
        }
        if encoding != "/base16/" {
            return Err(format(&format!("the encoding is `{encoding}`; only /base16/ is read")));
        }
        Self::from_hex(hex).map_err(|reason| format(&reason))
    }

    /// The key as 64 hex digits (what the page takes from its URL fragment).
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the key is {} characters, not 64 hex digits", hex.len()));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self::from_bytes(bytes))
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<Self, SwarmKeyError> {
        let shown = path.display().to_string();
        // A key file is three short lines; anything big is not one.
        let text = std::fs::read(path).map_err(|source| SwarmKeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if text.len() > 4096 {
            return Err(SwarmKeyError::Format {
                path: shown,
                reason: format!("the file is {} bytes", text.len()),
            });
        }
        Self::parse(&String::from_utf8_lossy(&text), &shown)
    }

    /// A fresh random key in the file format.
    pub fn generate_file() -> Result<String, std::io::Error> {
        let bytes: [u8; 32] = random_bytes()?;
        Ok(PreSharedKey::new(bytes).to_key_file())
    }

    pub fn psk(&self) -> PreSharedKey {
        self.psk
    }

    /// go-libp2p's fingerprint of the key: safe to log, equal on every peer of the swarm.
    pub fn fingerprint(&self) -> String {
        self.psk.fingerprint().to_string()
    }

    /// The DHT key that stands for `key` in this swarm.
    pub fn seal_key(&self, key: &RecordKey) -> RecordKey {
        let mut mac = hmac(&self.names);
        mac.update(key.as_ref());
        let digest = hex(&mac.finalize().into_bytes()[..20]);
        match key_owner(key) {
            Some(owner) => RecordKey::new(&format!("{SEALED_KEY_PREFIX}{digest}/{owner}")),
            None => RecordKey::new(&format!("{SEALED_KEY_PREFIX}{digest}")),
        }
    }

    /// `value` sealed for the DHT under the sealed form of `key`.
    pub fn seal(&self, key: &RecordKey, value: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce: [u8; SEAL_NONCE_BYTES] = random_bytes().map_err(SealError::Random)?;
        let cipher = XChaCha20Poly1305::new(&self.seal.into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: key.as_ref(),
                },
            )
            .map_err(|_| SealError::TooLarge)?;
        let mut out = Vec::with_capacity(SEAL_NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The value a record sealed by [`Self::seal`] under `key` holds; `None` if it was not
    /// sealed with this swarm's key (or was changed).
    pub fn open(&self, key: &RecordKey, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_NONCE_BYTES {
            return None;
        }
        let (nonce, body) = sealed.split_at(SEAL_NONCE_BYTES);
        XChaCha20Poly1305::new(&self.seal.into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: key.as_ref(),
                },
            )
            .ok()
    }

    /// The MAC a `role` sends: over both nonces (dialer's first) and both peer ids.
    fn proof_mac(&self, role: &[u8], nonces: (&[u8], &[u8]), prover: &PeerId, verifier: &PeerId) -> HmacSha256 {
        let mut mac = hmac(&self.auth);
        mac.update(AUTH_PROTOCOL.as_ref().as_bytes());
        mac.update(role);
        mac.update(nonces.0);
        mac.update(nonces.1);
        mac.update(&prover.to_bytes());
        mac.update(&verifier.to_bytes());
        mac
    }

    fn proof(&self, role: &[u8], nonces: (&[u8], &[u8]), prover: &PeerId, verifier: &PeerId) -> [u8; MAC_BYTES] {
        self.proof_mac(role, nonces, prover, verifier)
            .finalize()
            .into_bytes()
            .into()
    }

    fn check(&self, role: &[u8], nonces: (&[u8], &[u8]), prover: &PeerId, verifier: &PeerId, proof: &[u8]) -> bool {
        // Constant-time comparison.
        self.proof_mac(role, nonces, prover, verifier)
            .verify_slice(proof)
            .is_ok()
    }
}

fn hmac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length: this never fails.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts 32-byte keys"))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], std::io::Error> {
    let mut out = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut out)
        .map_err(std::io::Error::other)?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const DIALER: &[u8] = b"/dialer";
const LISTENER: &[u8] = b"/listener";

/// The dialer's side of [`AUTH_PROTOCOL`]: proves the key to `remote` and checks that it holds
/// it too.
pub async fn prove_dialer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &SwarmKey,
    local: &PeerId,
    remote: &PeerId,
) -> Result<(), AuthError> {
    let mine: [u8; NONCE_BYTES] = random_bytes()?;
    stream.write_all(&mine).await?;
    stream.flush().await?;
    let mut theirs = [0u8; NONCE_BYTES];
    stream.read_exact(&mut theirs).await?;
    let mut their_proof = [0u8; MAC_BYTES];
    stream.read_exact(&mut their_proof).await?;
    if !key.check(LISTENER, (&mine, &theirs), remote, local, &their_proof) {
        return Err(AuthError::WrongKey);
    }
    stream
        .write_all(&key.proof(DIALER, (&mine, &theirs), local, remote))
        .await?;
    stream.flush().await?;
    let mut verdict = [0u8; 1];
    stream.read_exact(&mut verdict).await?;
    if verdict[0] != 1 {
        return Err(AuthError::WrongKey);
    }
    Ok(())
}

/// The listener's side of [`AUTH_PROTOCOL`]: `Ok` once `remote` has proven it holds the key.
pub async fn prove_listener<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &SwarmKey,
    local: &PeerId,
    remote: &PeerId,
) -> Result<(), AuthError> {
    let mut theirs = [0u8; NONCE_BYTES];
    stream.read_exact(&mut theirs).await?;
    let mine: [u8; NONCE_BYTES] = random_bytes()?;
    stream.write_all(&mine).await?;
    stream
        .write_all(&key.proof(LISTENER, (&theirs, &mine), local, remote))
        .await?;
    stream.flush().await?;
    let mut their_proof = [0u8; MAC_BYTES];
    stream.read_exact(&mut their_proof).await?;
    let ok = key.check(DIALER, (&theirs, &mine), remote, local, &their_proof);
    stream.write_all(&[u8::from(ok)]).await?;
    stream.flush().await?;
    if ok { Ok(()) } else { Err(AuthError::WrongKey) }
}

/// Whether `pnet` protects connections over this address: TCP and relay circuits carry plain
/// byte streams it wraps; QUIC and WebRTC do not.
pub fn pnet_protects(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(
            p,
            Protocol::QuicV1 | Protocol::Quic | Protocol::WebRTCDirect | Protocol::WebRTC
        )
    }) || addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Where a peer stands with a private swarm's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It reached us over `pnet`, or proved the key: a member.
    Member,
    /// Only over connections that no `pnet` protects, whose proof is still due.
    Pending,
    /// Not connected, or its time ran out: nothing of it is served.
    Outsider,
}

/// Every connection's peer and, while it owes a proof of the key, its deadline.
#[derive(Debug, Default)]
pub struct AuthGuard {
    connections: HashMap<ConnectionId, (PeerId, Option<Instant>)>,
    members: HashSet<PeerId>,
}

impl AuthGuard {
    /// Records a new connection: over `pnet` it shows its peer holds the key; otherwise the
    /// clock starts on its proof (unless its peer is already a member: the transport
    /// authenticated the peer id).
    pub fn on_established(&mut self, id: ConnectionId, peer: PeerId, endpoint: &ConnectedPoint, now: Instant) {
        if pnet_protects(endpoint.get_remote_address()) {
            self.connections.insert(id, (peer, None));
            self.authenticated(&peer);
        } else {
            let deadline = (!self.members.contains(&peer)).then(|| now + AUTH_TIMEOUT);
            self.connections.insert(id, (peer, deadline));
        }
    }

    pub fn on_closed(&mut self, id: ConnectionId) {
        if let Some((peer, _)) = self.connections.remove(&id)
            && !self.connections.values().any(|(p, _)| *p == peer)
        {
            self.members.remove(&peer);
        }
    }

    /// `peer` proved the key: every connection of it is let in (the transports authenticated
    /// the peer id of each). A peer with no connection left is not remembered.
    pub fn authenticated(&mut self, peer: &PeerId) {
        let mut connected = false;
        for (p, deadline) in self.connections.values_mut() {
            if p == peer {
                *deadline = None;
                connected = true;
            }
        }
        if connected {
            self.members.insert(*peer);
        }
    }

    pub fn standing(&self, peer: &PeerId) -> Standing {
        if self.members.contains(peer) {
            Standing::Member
        } else if self.connections.values().any(|(p, d)| p == peer && d.is_some()) {
            Standing::Pending
        } else {
            Standing::Outsider
        }
    }

    /// The connections whose time ran out (forgotten here; the caller closes them).
    pub fn expired(&mut self, now: Instant) -> Vec<(ConnectionId, PeerId)> {
        let out: Vec<(ConnectionId, PeerId)> = self
            .connections
            .iter()
            .filter(|(_, (_, deadline))| deadline.is_some_and(|d| d <= now))
            .map(|(id, (peer, _))| (*id, *peer))
            .collect();
        for (id, _) in &out {
            self.connections.remove(id);
        }
        out
    }
}

/// An [`AuthGuard`] shared by a node's event loop, its proof tasks and its stream acceptors,
/// which wait on it for a pending peer's verdict.
#[derive(Debug, Clone)]
pub struct Gate {
    guard: Arc<Mutex<AuthGuard>>,
    changed: Arc<watch::Sender<()>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            guard: Arc::default(),
            changed: Arc::new(watch::Sender::new(())),
        }
    }
}

impl Gate {
    /// Runs `f` on the guard and wakes the waiters.
    pub fn update<R>(&self, f: impl FnOnce(&mut AuthGuard) -> R) -> R {
        let out = f(&mut self.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.changed.send_replace(());
        out
    }

    pub fn standing(&self, peer: &PeerId) -> Standing {
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .standing(peer)
    }

    /// Whether `peer` is a member, waiting while its proof is pending (never past
    /// [`AUTH_TIMEOUT`], whatever the event loop does).
    pub async fn admits(&self, peer: &PeerId) -> bool {
        let mut changed = self.changed.subscribe();
        let verdict = async {
            loop {
                match self.standing(peer) {
                    Standing::Member => return true,
                    Standing::Outsider => return false,
                    Standing::Pending => {
                        if changed.changed().await.is_err() {
                            return false;
                        }
                    }
                }
            }
        };
        crate::rt::timeout(AUTH_TIMEOUT, verdict).await.unwrap_or(false)
    }
}

/// Answers the proofs of the key that peers send over [`AUTH_PROTOCOL`] (on connections no
/// `pnet` protects), and lets the peers that pass through `gate`.
pub async fn accept_proofs(mut incoming: libp2p_stream::IncomingStreams, key: SwarmKey, local: PeerId, gate: Gate) {
    // Each proof is a few round trips under a deadline; a bounded number run at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some((peer, mut stream)) = futures::StreamExt::next(&mut incoming).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many proofs of the swarm key at once: dropped");
            continue;
        };
        let key = key.clone();
        let gate = gate.clone();
        crate::rt::spawn(async move {
            let _slot = slot;
            let proof = prove_listener(&mut stream, &key, &local, &peer);
            match crate::rt::timeout(AUTH_TIMEOUT, proof).await {
                Ok(Ok(())) => {
                    tracing::debug!(%peer, "peer proved the swarm key");
                    gate.update(|g| g.authenticated(&peer));
                }
                Ok(Err(error)) => tracing::info!(%peer, %error, "proof of the swarm key failed"),
                Err(_) => tracing::info!(%peer, "proof of the swarm key timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SwarmKey {
        SwarmKey::from_bytes([byte; 32])
    }

    #[test]
    fn the_ipfs_key_file_format_is_read_and_bad_files_say_why() {
        let file = SwarmKey::generate_file().expect("random");
        let parsed = SwarmKey::parse(&file, "swarm.key").expect("generated file");
        assert_eq!(parsed.fingerprint(), parsed.psk().fingerprint().to_string());
        let crlf = file.replace('\n', "\r\n");
        assert!(SwarmKey::parse(&crlf, "swarm.key").is_ok(), "CRLF line ends");
        for (bad, says) in [
            ("", "0 non-empty lines"),
            ("/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n", "only /base16/"),
            ("/key/other/\n/base16/\n00\n", "first line"),
            ("/key/swarm/psk/1.0.0/\n/base16/\n0123\n", "not 64 hex digits"),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "zz".repeat(32)),
                "not 64 hex",
            ),
        ] {
            let err = SwarmKey::parse(bad, "k").expect_err(bad).to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sealed_records_open_only_with_the_same_key_and_the_same_dht_key() {
        let k = key(1);
        let name = RecordKey::new(&"corolla/servers");
        let sealed_name = k.seal_key(&name);
        assert_ne!(sealed_name, name);
        assert_eq!(k.seal_key(&name), sealed_name, "deterministic: every peer finds it");
        assert_ne!(key(2).seal_key(&name), sealed_name);
        let value = b"a signed server record".to_vec();
        let sealed = k.seal(&sealed_name, &value).expect("sealed");
        assert_eq!(k.open(&sealed_name, &sealed), Some(value.clone()));
        assert_ne!(
            k.seal(&sealed_name, &value).expect("sealed"),
            sealed,
            "fresh nonce each time"
        );
        assert_eq!(key(2).open(&sealed_name, &sealed), None, "another swarm's key");
        assert_eq!(
            k.open(&k.seal_key(&RecordKey::new(&"other")), &sealed),
            None,
            "moved to another key"
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(k.open(&sealed_name, &flipped), None, "tampered");
        assert_eq!(k.open(&sealed_name, &sealed[..10]), None, "truncated");
    }

    #[test]
    fn sealed_keys_keep_their_owner_so_stores_still_check_it() {
        let peer = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let k = key(1);
        // The model's name holds characters that neither the hex digest nor a base58 peer id
        // can hold, so finding it in the sealed key means it leaked, never a chance match.
        let model = "secret_OIl0_model";
        let sealed = k.seal_key(&RecordKey::new(&format!("corolla/server/{model}/{peer}")));
        assert_eq!(key_owner(&sealed), Some(peer));
        assert!(!String::from_utf8_lossy(sealed.as_ref()).contains(model));
        assert!(!String::from_utf8_lossy(sealed.as_ref()).contains("secret"));
    }

    async fn handshake(dialer_key: SwarmKey, listener_key: SwarmKey) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (a, b) = (PeerId::random(), PeerId::random());
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (da, lb) = tokio::io::duplex(256);
        let (mut da, mut lb) = (da.compat(), lb.compat());
        // Each side owns its end and drops it when done, as a real stream would be.
        futures::join!(
            async move { prove_dialer(&mut da, &dialer_key, &a, &b).await },
            async move { prove_listener(&mut lb, &listener_key, &b, &a).await }
        )
    }

    #[tokio::test]
    async fn both_sides_prove_the_key_and_a_wrong_key_fails_on_both() {
        let (d, l) = handshake(key(1), key(1)).await;
        assert!(d.is_ok() && l.is_ok(), "{d:?} {l:?}");
        let (d, l) = handshake(key(1), key(2)).await;
        assert!(matches!(d, Err(AuthError::WrongKey)), "{d:?}");
        // The dialer stops at the listener's bad proof and never answers.
        assert!(l.is_err(), "{l:?}");
    }

    #[test]
    fn only_quic_and_webrtc_connections_wait_for_a_proof() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("addr");
        let circuit: Multiaddr = format!(
            "/ip4/127.0.0.1/udp/4002/webrtc-direct/p2p/{}/p2p-circuit",
            PeerId::random()
        )
        .parse()
        .expect("addr");
        let webrtc: Multiaddr = "/ip4/127.0.0.1/udp/4002/webrtc-direct".parse().expect("addr");
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/4002/quic-v1".parse().expect("addr");
        assert!(pnet_protects(&tcp) && pnet_protects(&circuit));
        assert!(!pnet_protects(&webrtc) && !pnet_protects(&quic));

        let mut guard = AuthGuard::default();
        let now = Instant::now();
        let listener = |addr: &Multiaddr| ConnectedPoint::Listener {
            local_addr: addr.clone(),
            send_back_addr: addr.clone(),
        };
        let id = ConnectionId::new_unchecked;
        // A peer over WebRTC waits; its pnet connection shows it holds the key.
        let member = PeerId::random();
        guard.on_established(id(1), member, &listener(&webrtc), now);
        assert_eq!(guard.standing(&member), Standing::Pending);
        guard.on_established(id(2), member, &listener(&tcp), now);
        assert_eq!(guard.standing(&member), Standing::Member);
        // One that proves it is let in, and its later connections need no proof.
        let browser = PeerId::random();
        guard.on_established(id(3), browser, &listener(&webrtc), now);
        guard.authenticated(&browser);
        guard.on_established(id(4), browser, &listener(&webrtc), now);
        assert_eq!(guard.standing(&browser), Standing::Member);
        // One that does not is reported once its time is up, and is an outsider from then on.
        let outsider = PeerId::random();
        guard.on_established(id(5), outsider, &listener(&webrtc), now);
        assert_eq!(guard.standing(&outsider), Standing::Pending);
        assert!(guard.expired(now).is_empty());
        assert_eq!(guard.expired(now + AUTH_TIMEOUT), vec![(id(5), outsider)]);
        assert!(
            guard.expired(now + AUTH_TIMEOUT * 2).is_empty(),
            "forgotten once reported"
        );
        assert_eq!(guard.standing(&outsider), Standing::Outsider);
        // A proof for a peer with no connection left lets nothing in later.
        guard.authenticated(&outsider);
        assert_eq!(guard.standing(&outsider), Standing::Outsider);
        // Membership ends with the last connection.
        guard.on_closed(id(3));
        assert_eq!(guard.standing(&browser), Standing::Member);
        guard.on_closed(id(4));
        assert_eq!(guard.standing(&browser), Standing::Outsider);
        assert_eq!(guard.standing(&PeerId::random()), Standing::Outsider);
    }

    #[tokio::test]
    async fn the_gate_holds_a_pending_peer_until_its_verdict() {
        let webrtc: Multiaddr = "/ip4/127.0.0.1/udp/4002/webrtc-direct".parse().expect("addr");
        let endpoint = ConnectedPoint::Listener {
            local_addr: webrtc.clone(),
            send_back_addr: webrtc,
        };
        let gate = Gate::default();
        let (proven, failed) = (PeerId::random(), PeerId::random());
        for (n, peer) in [(1, proven), (2, failed)] {
            gate.update(|g| g.on_established(ConnectionId::new_unchecked(n), peer, &endpoint, Instant::now()));
        }
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { (gate.admits(&proven).await, gate.admits(&failed).await) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a pending peer was decided early");
        gate.update(|g| g.authenticated(&proven));
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.update(|g| g.on_closed(ConnectionId::new_unchecked(2)));
        assert_eq!(waiting.await.expect("task"), (true, false));
        assert!(!gate.admits(&PeerId::random()).await, "a stranger is no member");
    }
}
