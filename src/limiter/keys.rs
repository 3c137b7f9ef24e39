//! The keys failures are charged to, each naming the caller that presents it: the credential
//! (a keyed hash of the app credential the request carries) and the client address. A key never
//! holds a raw credential, is never logged, and is never a metric label. The only user of ring
//! (HMAC-SHA256, per-process random key) and ipnet.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use ring::hmac;
use ring::rand::SystemRandom;

use crate::rewrite::basic_credentials;

/// Bytes of the HMAC-SHA256 tag kept as the key: 128 bits, so no two credentials share a key
/// by accident, and without the per-process HMAC key nobody can make one collide on purpose.
const CREDENTIAL_KEY_BYTES: usize = 16;

/// Leading bits of an IPv6 client address that form its key: one /64 is one site or host (RFC
/// 6177 §2), and a host that owns a /64 could otherwise make up a new key per request.
const IPV6_KEY_PREFIX: u8 = 64;

/// A keyed hash of the app credential a request presents. Opaque: its `Debug` shows nothing of
/// the value, and it has no `Display`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    tag: [u8; CREDENTIAL_KEY_BYTES],
    basic: bool,
}

impl CredentialKey {
    /// The tag in lowercase hex, for a key name in a shared store. The tag is a keyed hash:
    /// it names the credential without revealing it.
    pub fn hex(&self) -> String {
        hex(&self.tag)
    }

    /// The tag itself.
    pub fn tag(&self) -> [u8; CREDENTIAL_KEY_BYTES] {
        self.tag
    }

    /// Whether the request presented Basic credentials (rather than the client_id alone): only
    /// those can be verified by the upstream's acceptance.
    pub fn is_basic(&self) -> bool {
        self.basic
    }
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialKey(..)")
    }
}

/// Why the hashing key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no random bytes for the limiter's hashing key from the operating system")]
pub struct NoRandomness;

/// Turns credentials into [`CredentialKey`]s with a key drawn at start-up and never stored.
/// Clones share the key (a reloaded limiter keys the same credentials the same way).
#[derive(Clone)]
pub struct CredentialHasher {
    key: hmac::Key,
}

impl fmt::Debug for CredentialHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialHasher(..)")
    }
}

/// The SHA-256 digest of `bytes` (for naming a configuration file's content in logs and
/// metrics; not a credential).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl CredentialHasher {
    /// A hasher with a fresh random HMAC-SHA256 key from the operating system.
    ///
    /// # Errors
    /// [`NoRandomness`] when the operating system gives no random bytes.
    pub fn new() -> Result<Self, NoRandomness> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| NoRandomness)?;
        Ok(CredentialHasher { key })
    }

    /// A hasher with `key` as its HMAC-SHA256 key: every replica that shares a store keys the
    /// same credential alike (`[shared]`).
    pub fn with_key(key: &[u8]) -> Self {
        CredentialHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// 32 random bytes from the operating system, for [`CredentialHasher::with_key`].
    ///
    /// # Errors
    /// [`NoRandomness`] when the operating system gives none.
    pub fn random_key() -> Result<[u8; 32], NoRandomness> {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut key).map_err(|_| NoRandomness)?;
        Ok(key)
    }

    /// The keyed hash of a client address key ([`address_key`]), for a key name in a shared
    /// store: an address is never written there in clear.
    pub fn address_tag(&self, ip: IpAddr) -> [u8; CREDENTIAL_KEY_BYTES] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"client_ip\0");
        match ip {
            IpAddr::V4(v4) => ctx.update(&v4.octets()),
            IpAddr::V6(v6) => ctx.update(&v6.octets()),
        }
        let mut tag = [0u8; CREDENTIAL_KEY_BYTES];
        tag.copy_from_slice(&ctx.sign().as_ref()[..CREDENTIAL_KEY_BYTES]);
        tag
    }

    /// The key of the app credential a request presents: its Basic `client_id:client_secret`
    /// (GitHub REST: OAuth Applications use Basic authentication with the app's client_id and
    /// client_secret), decoded, so one credential is one key however its base64 is spelled; or,
    /// when it presents none (no `Authorization`, another scheme, or Basic credentials that do
    /// not decode), the `client_id` of the path alone. Each form is hashed under its own label,
    /// and the client_id's length goes first, so no two different credentials hash alike.
    pub fn key(&self, authorization: Option<&HeaderValue>, client_id: &str) -> CredentialKey {
        let mut ctx = hmac::Context::with_key(&self.key);
        let basic = authorization.and_then(basic_credentials);
        match &basic {
            Some(c) => {
                ctx.update(b"basic\0");
                ctx.update(&(c.user().len() as u64).to_le_bytes());
                ctx.update(c.user());
                ctx.update(c.password());
            }
            None => {
                ctx.update(b"client_id\0");
                ctx.update(client_id.as_bytes());
            }
        }
        let mut tag = [0u8; CREDENTIAL_KEY_BYTES];
        tag.copy_from_slice(&ctx.sign().as_ref()[..CREDENTIAL_KEY_BYTES]);
        CredentialKey {
            tag,
            basic: basic.is_some(),
        }
    }
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Finds the client address of a request, believing `X-Forwarded-For` only from trusted proxies.
#[derive(Debug, Clone, Default)]
pub struct ClientAddress {
    trusted_proxies: Vec<IpNet>,
}

impl ClientAddress {
    /// Believes `X-Forwarded-For` from peers inside `trusted_proxies`.
    pub fn new(trusted_proxies: Vec<IpNet>) -> Self {
        ClientAddress { trusted_proxies }
    }

    /// The client address: the peer; or, when the peer is a trusted proxy, the rightmost
    /// `X-Forwarded-For` entry that is not itself a trusted proxy (entries left of it were
    /// written by the client and prove nothing). An unparsable entry stops the walk at the last
    /// trusted hop. IPv4-mapped IPv6 addresses read as IPv4.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("").rsplit(','));
        for hop in hops {
            let Some(ip) = parse_hop(hop.trim()) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// The address key of a client: an IPv4 address as is, an IPv6 address cut to its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << (128 - u32::from(IPV6_KEY_PREFIX)));
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// One `X-Forwarded-For` entry: an address, maybe with a port or in brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(raw: &str) -> HeaderValue {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::STANDARD.encode(raw);
        HeaderValue::try_from(format!("Basic {enc}")).unwrap()
    }

    #[test]
    fn each_credential_is_its_own_key() {
        let h = CredentialHasher::new().unwrap();
        let app = h.key(Some(&basic("Iv1.app:right")), "Iv1.app");
        // The same credential, however the scheme is spelled, is the same caller.
        let spelled = basic("Iv1.app:right")
            .to_str()
            .unwrap()
            .replace("Basic ", "basic   ");
        let spelled = HeaderValue::try_from(spelled).unwrap();
        assert_eq!(h.key(Some(&spelled), "other-path-id"), app);
        let cases = [
            h.key(Some(&basic("Iv1.app:wrong")), "Iv1.app"),
            h.key(None, "Iv1.app"),
            // A user token is no app credential: the path's client_id alone.
            h.key(Some(&HeaderValue::from_static("token gho_x")), "Iv1.app"),
            // Neither is Basic that does not decode.
            h.key(Some(&HeaderValue::from_static("Basic !!junk")), "Iv1.app"),
            h.key(Some(&basic("Iv1.other:right")), "Iv1.app"),
            // The colon is where the client_id ends: "a:b:c" is not "a:b" + "c" moved.
            h.key(Some(&basic("Iv1.app:ri:ght")), "Iv1.app"),
        ];
        for (i, k) in cases.iter().enumerate() {
            assert_ne!(*k, app, "case {i}");
        }
        assert_eq!(cases[1], cases[2], "no credential: the client_id alone");
        assert_eq!(cases[1], cases[3], "undecodable: the client_id alone");
        assert!(app.is_basic() && !cases[1].is_basic() && !cases[3].is_basic());
        assert_ne!(
            h.key(Some(&basic("ab:c")), "x"),
            h.key(Some(&basic("a:bc")), "x"),
            "the client_id's length is part of the hash"
        );
    }

    #[test]
    fn keys_differ_between_processes_and_show_nothing() {
        let (a, b) = (
            CredentialHasher::new().unwrap(),
            CredentialHasher::new().unwrap(),
        );
        let cred = basic("Iv1.app:right");
        assert_ne!(a.key(Some(&cred), "x"), b.key(Some(&cred), "x"));
        assert_eq!(
            format!("{:?}", a.key(Some(&cred), "x")),
            "CredentialKey(..)"
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            address_key(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            address_key(ip("2001:db8:1:3::1")),
            address_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(address_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn client_address_from_forwarded_for_only_behind_trusted_proxies() {
        let a = ClientAddress::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let hdr = |v: &[&str]| {
            let mut h = HeaderMap::new();
            for x in v {
                h.append("x-forwarded-for", x.parse().unwrap());
            }
            h
        };
        let cases: &[(&str, &[&str], &str)] = &[
            // Untrusted peer: its own address, whatever it claims.
            ("198.51.100.7", &["203.0.113.5"], "198.51.100.7"),
            // Trusted peer: the rightmost untrusted hop.
            ("10.1.2.3", &["203.0.113.5"], "203.0.113.5"),
            (
                "10.1.2.3",
                &["1.1.1.1, 203.0.113.5, 10.9.9.9"],
                "203.0.113.5",
            ),
            (
                "10.1.2.3",
                &["1.1.1.1", "203.0.113.5, 10.9.9.9"],
                "203.0.113.5",
            ),
            ("10.1.2.3", &["[2001:db8::5]:443"], "2001:db8::5"),
            ("10.1.2.3", &["203.0.113.5:8443"], "203.0.113.5"),
            // No header, garbage, or only trusted hops: the last trusted address reached.
            ("10.1.2.3", &[], "10.1.2.3"),
            ("10.1.2.3", &["not-an-ip"], "10.1.2.3"),
            ("10.1.2.3", &["203.0.113.5, garbage, 10.9.9.9"], "10.9.9.9"),
            ("10.1.2.3", &["10.4.4.4, 10.9.9.9"], "10.4.4.4"),
            // IPv4-mapped IPv6 peers count as IPv4.
            ("::ffff:10.1.2.3", &["203.0.113.5"], "203.0.113.5"),
            ("fd00::1", &["2001:db8::9"], "2001:db8::9"),
        ];
        for (peer, xff, want) in cases {
            assert_eq!(a.resolve(ip(peer), &hdr(xff)), ip(want), "{peer} {xff:?}");
        }
    }
}
