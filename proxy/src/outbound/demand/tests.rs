use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_connection_is_needed_only_for_requests_the_live_ones_cannot_carry() {
    let mut s = State::default();
    assert!(!s.needed(), "nothing in flight");
    s.in_flight = 1;
    assert!(s.needed());
    s.connecting = 1;
    assert!(!s.needed(), "the attempt under way will carry it");
    s.in_flight = 60;
    assert!(s.needed());
    s.connecting = MAX_CONNECTING - 1;
    assert!(s.needed());
    s.connecting = MAX_CONNECTING;
    assert!(!s.needed(), "at most MAX_CONNECTING attempts at once");
    s.connecting = 1;
    s.live_h1 = 1;
    assert!(!s.needed(), "one at a time once a connection is live");
    s.connecting = 0;
    assert!(s.needed());
    s.live_h1 = 60;
    assert!(!s.needed(), "one live connection per request");
    s.live_h1 = 0;
    s.live_h2 = 1;
    assert!(!s.needed(), "an HTTP/2 connection carries every request");
}

#[tokio::test]
async fn an_attempt_nobody_needs_gives_up_without_counting() {
    let demand = Demand::new();
    assert_eq!(demand.attempt(ms(30)).await.unwrap_err(), NotNeeded(ms(30)));
    assert_eq!(demand.snapshot(), State::default());
}

#[tokio::test]
async fn a_burst_makes_max_connecting_attempts_and_no_more_than_the_requests_need() {
    let demand = Demand::new();
    let mut requests: Vec<InFlight> = (0..60).map(|_| demand.request()).collect();
    // One attempt per waiting request, as hyper's pool starts them.
    let attempts: Vec<_> = (0..60)
        .map(|_| {
            let demand = Arc::clone(&demand);
            tokio::spawn(async move { demand.attempt(ms(300)).await })
        })
        .collect();
    tokio::time::sleep(ms(50)).await;
    assert_eq!(demand.snapshot().connecting, MAX_CONNECTING);
    assert_eq!(
        attempts.iter().filter(|a| a.is_finished()).count(),
        MAX_CONNECTING
    );

    // Pooled connections carry all but 6 requests meanwhile; the first attempts connect.
    requests.truncate(6);
    let mut finished = Vec::new();
    let mut pending = Vec::new();
    for attempt in attempts {
        if attempt.is_finished() {
            finished.push(attempt.await.unwrap().unwrap());
        } else {
            pending.push(attempt);
        }
    }
    let mut live: Vec<Live> = finished.into_iter().map(|a| a.connected(false)).collect();
    // 6 in flight, 4 live: 2 more are needed (one at a time), then none.
    let mut made = 0;
    let mut not_needed = 0;
    for attempt in pending {
        match attempt.await.unwrap() {
            Ok(attempt) => {
                made += 1;
                live.push(attempt.connected(false));
            }
            Err(NotNeeded(wait)) => {
                assert_eq!(wait, ms(300));
                not_needed += 1;
            }
        }
    }
    assert_eq!((made, not_needed), (2, 54));
    assert_eq!(
        demand.snapshot(),
        State {
            in_flight: 6,
            live_h1: 6,
            live_h2: 0,
            connecting: 0
        }
    );
    drop(live);
    drop(requests);
    assert_eq!(demand.snapshot(), State::default());
}

#[tokio::test]
async fn a_waiting_attempt_goes_when_a_request_needs_it_or_a_connection_closes() {
    let demand = Demand::new();
    let request = demand.request();
    let first = demand.attempt(ms(100)).await.unwrap().connected(false);
    let waiting = {
        let demand = Arc::clone(&demand);
        tokio::spawn(async move { demand.attempt(Duration::from_secs(30)).await })
    };
    tokio::time::sleep(ms(30)).await;
    assert!(!waiting.is_finished(), "one request, one live connection");
    let second_request = demand.request();
    let second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the new request")
        .unwrap()
        .unwrap()
        .connected(false);

    // Both connections live and busy; a third request's attempt waits, and goes once a
    // connection closes (the pool dropped it) while the request still waits.
    let third_request = demand.request();
    let attempt = demand.attempt(ms(100)).await.unwrap();
    drop(attempt); // The attempt failed: it no longer counts.
    assert_eq!(demand.snapshot().connecting, 0);
    let waiting = {
        let demand = Arc::clone(&demand);
        tokio::spawn(async move { demand.attempt(Duration::from_secs(30)).await })
    };
    // Needed right away: 3 in flight, 2 live.
    let third = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .connected(false);
    let waiting = {
        let demand = Arc::clone(&demand);
        tokio::spawn(async move { demand.attempt(Duration::from_secs(30)).await })
    };
    tokio::time::sleep(ms(30)).await;
    assert!(!waiting.is_finished());
    drop(first);
    let replacement = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the closed connection")
        .unwrap()
        .unwrap();
    drop((
        replacement,
        second,
        third,
        request,
        second_request,
        third_request,
    ));
    assert_eq!(demand.snapshot(), State::default());
}

#[tokio::test]
async fn no_attempt_while_an_http2_connection_is_live() {
    let demand = Demand::new();
    let requests: Vec<InFlight> = (0..10).map(|_| demand.request()).collect();
    let h2 = demand.attempt(ms(100)).await.unwrap().connected(true);
    assert!(demand.attempt(ms(30)).await.is_err());
    drop(h2);
    assert!(demand.attempt(ms(30)).await.is_ok(), "gone: needed again");
    drop(requests);
}
