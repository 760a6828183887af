//! The proxy's `--inbound` / `--outbound` values, checked as `meshward proxy run` will parse them.
//!
//! The injector refuses a listener annotation the proxy would refuse at start-up, so a bad one
//! fails `meshward inject` (or the pod's creation) instead of leaving a pod that never gets ready.
//! The messages are the proxy's own (`invalid `inbound` `...`: ...`).

use std::net::SocketAddr;

use meshward_identity::SpiffeId;

/// The listen port of an inbound listener `LISTEN=APP_ADDR[,tcp]`.
pub fn inbound_port(spec: &str) -> Result<u16, String> {
    const NAME: &str = "inbound";
    const FORM: &str = "write `LISTEN=APP_ADDR[,tcp]`";
    let (listen, rest) = spec
        .split_once('=')
        .ok_or_else(|| invalid(NAME, spec, FORM))?;
    let mut parts = rest.split(',');
    let app = parts.next().unwrap_or_default();
    let protocol = parts.next();
    if parts.next().is_some() {
        return Err(invalid(NAME, spec, FORM));
    }
    let listen = parse_addr(NAME, listen)?;
    parse_addr(NAME, app)?;
    check_protocol(NAME, protocol)?;
    Ok(listen.port())
}

/// The listen port of an outbound listener `LISTEN=UPSTREAM_ADDR,SPIFFE_ID[,tcp]`.
pub fn outbound_port(spec: &str) -> Result<u16, String> {
    const NAME: &str = "outbound";
    const FORM: &str = "write `LISTEN=UPSTREAM_ADDR,SPIFFE_ID[,tcp]`";
    let (listen, rest) = spec
        .split_once('=')
        .ok_or_else(|| invalid(NAME, spec, FORM))?;
    let mut parts = rest.split(',');
    let (Some(upstream), Some(id)) = (parts.next(), parts.next()) else {
        return Err(invalid(NAME, spec, FORM));
    };
    let protocol = parts.next();
    if parts.next().is_some() {
        return Err(invalid(NAME, spec, FORM));
    }
    check_host_port(NAME, upstream)?;
    let expected = SpiffeId::parse(id).map_err(|e| invalid(NAME, id, &e.to_string()))?;
    if expected.is_trust_domain_id() {
        return Err(invalid(
            NAME,
            id,
            "a workload's spiffe id has a path (`spiffe://td/ns/NS/sa/SA`)",
        ));
    }
    let listen = parse_addr(NAME, listen)?;
    check_protocol(NAME, protocol)?;
    Ok(listen.port())
}

fn parse_addr(setting: &str, value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        invalid(
            setting,
            value,
            "write an IP address and port, like `127.0.0.1:8080` or `[::1]:8080`",
        )
    })
}

fn check_protocol(setting: &str, value: Option<&str>) -> Result<(), String> {
    match value {
        None | Some("http" | "tcp") => Ok(()),
        Some(other) => Err(invalid(
            setting,
            other,
            "the protocol is `http` (the default) or `tcp`",
        )),
    }
}

fn check_host_port(setting: &str, value: &str) -> Result<(), String> {
    let bad = || {
        invalid(
            setting,
            value,
            "the upstream is `HOST:PORT`, like `orders.shop.svc:15006` or `10.0.0.7:15006`",
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(())
}

fn invalid(setting: &str, value: &str, reason: &str) -> String {
    format!("invalid `{setting}` `{value}`: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_listeners_give_their_port() {
        assert_eq!(inbound_port("0.0.0.0:8443=127.0.0.1:8080"), Ok(8443));
        assert_eq!(inbound_port("0.0.0.0:9000=127.0.0.1:9001,tcp"), Ok(9000));
        assert_eq!(
            outbound_port("127.0.0.1:15001=orders.shop.svc:15006,spiffe://td/ns/shop/sa/orders"),
            Ok(15001)
        );
    }

    #[test]
    fn bad_listeners_say_what_to_write() {
        let err = inbound_port("8443").unwrap_err();
        assert_eq!(
            err,
            "invalid `inbound` `8443`: write `LISTEN=APP_ADDR[,tcp]`"
        );
        assert!(
            inbound_port("0.0.0.0:1=127.0.0.1:2,udp")
                .unwrap_err()
                .contains("`udp`")
        );
        assert!(
            inbound_port("0.0.0.0:1=nowhere")
                .unwrap_err()
                .contains("`nowhere`")
        );
        let err = outbound_port("127.0.0.1:1=up:2,spiffe://td").unwrap_err();
        assert!(err.contains("has a path"), "{err}");
        let err = outbound_port("127.0.0.1:1=up,spiffe://td/x").unwrap_err();
        assert!(err.contains("HOST:PORT"), "{err}");
        assert!(
            outbound_port("127.0.0.1:1=up:2")
                .unwrap_err()
                .contains("UPSTREAM_ADDR")
        );
        assert!(outbound_port("127.0.0.1:1=up:2,http://x/y").is_err());
    }
}
