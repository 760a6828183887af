//! `x-forwarded-client-cert`: how the app learns who called, in Envoy's format.
//!
//! `By=<our id>;Hash=<sha256 of the caller's leaf, hex>;URI=<caller's id>`. SPIFFE IDs contain
//! no `;`, `,`, `=` or `"` (the SPIFFE-ID spec allows only letters, digits, `.`, `-`, `_` in
//! segments), so no quoting is needed. The value is built once per connection and cloned per
//! request (a reference count, not a copy).

use http::HeaderValue;
use http::header::HeaderName;
use meshward_identity::SpiffeId;

/// The header's name.
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The header value naming `peer` (whose leaf hashes to `peer_leaf_sha256`) as the caller of `us`.
pub fn xfcc_value(us: &SpiffeId, peer: &SpiffeId, peer_leaf_sha256: &[u8]) -> HeaderValue {
    let mut value = String::with_capacity(us.as_str().len() + peer.as_str().len() + 80);
    value.push_str("By=");
    value.push_str(us.as_str());
    value.push_str(";Hash=");
    for b in peer_leaf_sha256 {
        value.push(hex_digit(b >> 4));
        value.push(hex_digit(b & 0x0f));
    }
    value.push_str(";URI=");
    value.push_str(peer.as_str());
    // A SPIFFE ID is visible ASCII, so this cannot fail; an empty value is the safe fallback.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble), 16).unwrap_or('0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_envoys_format() {
        let us: SpiffeId = "spiffe://a.org/ns/shop/sa/api".parse().unwrap();
        let peer: SpiffeId = "spiffe://a.org/ns/shop/sa/web".parse().unwrap();
        let value = xfcc_value(&us, &peer, &[0xab, 0x01]);
        assert_eq!(
            value.to_str().unwrap(),
            "By=spiffe://a.org/ns/shop/sa/api;Hash=ab01;URI=spiffe://a.org/ns/shop/sa/web"
        );
    }
}
