//! Cluster mode against a real nats-server (with JetStream, on a free loopback port and a
//! temporary store directory): names unique across nodes, messages across nodes, a node
//! killed, NATS restarted.
//!
//! These tests need `nats-server` on the PATH (Debian: `apt-get install -y nats-server`;
//! `.ci/run` installs it). Without it they fail, saying so: they are never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::ServerProcess;
use common::{RawPeer, TestServer, WAIT, next_event, next_message, wait_until, within};
use relay_client::{Client, ConnectError, Event, Identity};
use relay_proto::Status;
use relay_server::cluster::{Cluster, ClusterConfig};
use relay_server::{Config, Server};
use tokio_util::sync::CancellationToken;

/// A nats-server with JetStream, stopped when dropped.
struct Nats {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RELAY_NATS_SERVER") {
        return path.into();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the cluster tests need nats-server, which is not on the PATH: install it \
             (Debian: apt-get install -y nats-server) or set RELAY_NATS_SERVER to its path"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Nats {
    async fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Nats::spawn(port, &dir).await;
        Nats { child, port, dir }
    }

    async fn spawn(port: u16, dir: &tempfile::TempDir) -> Child {
        let mut child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start nats-server: {e}"));
        let up = tokio::time::timeout(WAIT, async {
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if up.is_err() {
            let _ = child.kill();
            panic!("nats-server did not start listening on 127.0.0.1:{port}");
        }
        child
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and store.
    async fn start_again(&mut self) {
        self.child = Nats::spawn(self.port, &self.dir).await;
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lease the tests use: short, so a dead node's names free up quickly.
const LEASE: Duration = Duration::from_secs(2);

/// A node of the cluster, in process.
async fn node(nats: &Nats, name: &str) -> TestServer {
    node_with(nats, name, Config::default()).await
}

async fn node_with(nats: &Nats, name: &str, config: Config) -> TestServer {
    node_via(nats.url(), name, config).await
}

/// A node reaching NATS at `url` (through a proxy, say).
async fn node_via(url: String, name: &str, config: Config) -> TestServer {
    node_in(ClusterConfig::new(url, name).lease(LEASE), config).await
}

async fn node_in(cluster: ClusterConfig, config: Config) -> TestServer {
    let cluster = within(Cluster::connect(cluster)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config { data_dir: dir.path().to_path_buf(), ..config };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = within(Server::in_cluster(listener, config, cluster)).await.unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    TestServer { addr, handle, shutdown, task, data: Some(dir) }
}

async fn three_nodes(nats: &Nats) -> [TestServer; 3] {
    [node(nats, "n1").await, node(nats, "n2").await, node(nats, "n3").await]
}

fn key(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn lists(server: &TestServer, name: &str) -> bool {
    server.handle.users().iter().any(|(n, _)| n == name)
}

#[tokio::test]
async fn chat_crosses_nodes_both_ways_and_every_node_lists_the_whole_cluster() {
    let nats = Nats::start().await;
    let [n1, n2, n3] = three_nodes(&nats).await;
    let (alice, mut alice_events) = n1.connect("alice").await;
    let (bob, mut bob_events) = n2.connect("bob").await;
    let (carol, mut carol_events) = n3.connect("carol").await;
    for server in [&n1, &n2, &n3] {
        wait_until(|| ["alice", "bob", "carol"].iter().all(|name| lists(server, name))).await;
    }
    // A client's own listing shows everyone too.
    carol.list_users().await.unwrap();
    let users = match next_event(&mut carol_events).await {
        Event::Users { users, .. } => users,
        other => panic!("expected the users, got {other:?}"),
    };
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol"]);

    alice.send("bob", "hi bob, from n1").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "hi bob, from n1".into()));
    bob.send("alice", "hi alice, from n2").await.unwrap();
    assert_eq!(next_message(&mut alice_events).await, ("bob".into(), "hi alice, from n2".into()));
    // By address, as the listing shows it.
    let alice_addr = &users.iter().find(|u| u.name == "alice").unwrap().addr;
    carol.send(alice_addr, "by address").await.unwrap();
    assert_eq!(next_message(&mut alice_events).await, ("carol".into(), "by address".into()));

    // Per-sender order across nodes.
    for i in 0..200 {
        alice.send("carol", format!("{i}")).await.unwrap();
    }
    for i in 0..200 {
        assert_eq!(next_message(&mut carol_events).await, ("alice".into(), format!("{i}")));
    }

    // Nobody by that name anywhere: NotFound at once.
    let id = bob.send("nobody", "anyone?").await.unwrap();
    assert_eq!(next_event(&mut bob_events).await, Event::NotFound { id, to: "nobody".into() });

    // Gone from n2: every node stops listing it, and a message to it is NotFound.
    within(bob.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "bob") && !lists(&n3, "bob")).await;
    let id = alice.send("bob", "still there?").await.unwrap();
    assert_eq!(next_event(&mut alice_events).await, Event::NotFound { id, to: "bob".into() });

    // The operator of one node sees and kicks a user on another.
    let who = n1.handle.who("carol").unwrap();
    assert_eq!(who.node, "n3");
    assert!(n1.handle.kick("carol", "testing"));
    match next_event(&mut carol_events).await {
        Event::Closed { status, .. } => assert_eq!(status, Status::Kicked),
        other => panic!("expected a kick, got {other:?}"),
    }
    for server in [n1, n2, n3] {
        server.stop().await;
    }
}

#[tokio::test]
async fn messages_to_a_full_receiver_on_another_node_are_refused_and_the_others_arrive_in_order() {
    let nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    // Registered, then never reads: its outbox and socket fill up.
    let _slow = RawPeer::connect_small_buffer(n2.addr).await.register_as("slow").await;
    let (_fast, mut fast_events) = n2.connect("fast").await;
    let (flooder, mut flooder_events) = n1.connect("flooder").await;
    wait_until(|| lists(&n1, "slow") && lists(&n1, "fast")).await;
    // 6 MiB for slow (far more than its 1 MiB outbox), with messages for fast among them.
    let big = vec![b'x'; 4096];
    let mut to_fast = 0;
    for i in 0..1500 {
        within(flooder.send("slow", &big)).await.unwrap();
        if i % 10 == 0 {
            within(flooder.send("fast", format!("{to_fast}"))).await.unwrap();
            to_fast += 1;
        }
    }
    // fast gets every one of its messages, in order: slow's wait on n2 does not hold the link.
    for i in 0..to_fast {
        assert_eq!(next_message(&mut fast_events).await, ("flooder".into(), format!("{i}")));
    }
    // What found no room at slow was refused, and its sender told; nothing sent to fast was.
    match next_event(&mut flooder_events).await {
        Event::Rejected { status: Status::NotDelivered, to, .. } => assert_eq!(to, "slow"),
        other => panic!("expected slow's messages to be refused, got {other:?}"),
    }
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn fifty_racing_claims_of_one_name_across_three_nodes_have_exactly_one_winner() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let urls: Vec<String> = nodes.iter().map(TestServer::url).collect();

    // Guests racing for one name.
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..50 {
        let url = urls[n % 3].clone();
        racers.spawn(async move { (n % 3, Client::connect(&url, "prize").await) });
    }
    let (mut winners, mut taken) = (Vec::new(), 0);
    while let Some(joined) = within(racers.join_next()).await {
        match joined.unwrap() {
            (node, Ok((client, _events))) => winners.push((node, client)),
            (_, Err(ConnectError::NameTaken { .. })) => taken += 1,
            (_, Err(other)) => panic!("unexpected refusal: {other}"),
        }
    }
    assert_eq!((winners.len(), taken), (1, 49));
    let winner_node = format!("n{}", winners[0].0 + 1);
    // Every node (each reading the presence bucket) agrees on where the name is held.
    for server in &nodes {
        wait_until(|| server.handle.who("prize").is_some_and(|w| w.node == winner_node)).await;
    }

    // Keys racing to bind one name: one binds it, the others are told it is owned.
    let mut racers = tokio::task::JoinSet::new();
    for n in 0..50u8 {
        let url = urls[usize::from(n) % 3].clone();
        racers.spawn(async move {
            (n, Client::builder(url, "jewel").identity(key(100 + n)).connect().await)
        });
    }
    let (mut bound, mut owned) = (Vec::new(), 0);
    while let Some(joined) = within(racers.join_next()).await {
        match joined.unwrap() {
            (n, Ok((client, _events))) => bound.push((n, client)),
            (_, Err(ConnectError::NameOwned { .. } | ConnectError::NameTaken { .. })) => owned += 1,
            (_, Err(other)) => panic!("unexpected refusal: {other}"),
        }
    }
    assert_eq!((bound.len(), owned), (1, 49));
    let (winner, client) = bound.pop().unwrap();
    within(client.offline()).await.unwrap();
    // The name table agrees: only the winner's key logs in, on any node.
    for url in &urls {
        let loser = Client::builder(url.clone(), "jewel").identity(key(100 + (winner + 1) % 50));
        assert!(matches!(loser.connect().await, Err(ConnectError::NameOwned { .. })));
        let (again, _events) =
            within(Client::builder(url.clone(), "jewel").identity(key(100 + winner)).connect())
                .await
                .unwrap();
        within(again.offline()).await.unwrap();
    }
    drop(winners);
    for server in nodes {
        server.stop().await;
    }
}

#[tokio::test]
async fn a_bound_key_works_on_every_node_and_displaces_a_guest_on_another() {
    let nats = Nats::start().await;
    let [n1, n2, n3] = three_nodes(&nats).await;
    // Bound at n1, then logged in at n2 and n3 in turn.
    for server in [&n1, &n2, &n3] {
        let (client, _events) =
            within(Client::builder(server.url(), "dora").identity(key(1)).connect()).await.unwrap();
        within(client.offline()).await.unwrap();
        wait_until(|| !lists(&n1, "dora") && !lists(&n2, "dora") && !lists(&n3, "dora")).await;
    }
    // Another key, or a guest, is refused on any node.
    let other = Client::builder(n3.url(), "dora").identity(key(2)).connect().await;
    assert!(matches!(other, Err(ConnectError::NameOwned { .. })));
    assert!(matches!(
        Client::connect(&n2.url(), "dora").await,
        Err(ConnectError::NameOwned { .. })
    ));
    // Online at n1: a second login with the same key at n2 is refused as taken.
    let (_dora, _events) =
        within(Client::builder(n1.url(), "dora").identity(key(1)).connect()).await.unwrap();
    let twice = Client::builder(n2.url(), "dora").identity(key(1)).connect().await;
    assert!(matches!(twice, Err(ConnectError::NameTaken { .. })), "{twice:?}");

    // A guest holds "eve" at n1; the key that binds it at n2 takes it over.
    let (_guest, mut guest_events) = n1.connect("eve").await;
    wait_until(|| lists(&n2, "eve")).await;
    let (eve, _eve_events) =
        within(Client::builder(n2.url(), "eve").identity(key(3)).connect()).await.unwrap();
    match next_event(&mut guest_events).await {
        Event::Closed { status, .. } => assert_eq!(status, Status::NameOwned),
        other => panic!("expected the guest to be displaced, got {other:?}"),
    }
    wait_until(|| n3.handle.who("eve").is_some_and(|w| w.node == "n2")).await;
    drop(eve);
    for server in [n1, n2, n3] {
        server.stop().await;
    }
}

#[tokio::test]
async fn a_second_node_with_a_running_nodes_name_is_refused() {
    let nats = Nats::start().await;
    let n1 = node(&nats, "twin").await;
    let again = Cluster::connect(ClusterConfig::new(nats.url(), "twin").lease(LEASE)).await;
    let error = again.expect_err("a second node named twin was let in").to_string();
    assert!(error.contains("in use by a running node"), "{error}");
    n1.stop().await;
    // Once it has stopped (its lease deleted), the name is free again at once.
    let later = within(Cluster::connect(ClusterConfig::new(nats.url(), "twin").lease(LEASE))).await;
    assert!(later.is_ok(), "{later:?}");
}

#[tokio::test]
async fn a_node_killed_with_sigkill_frees_its_names_within_the_lease() {
    let nats = Nats::start().await;
    let n1 = node(&nats, "n1").await;
    let lease = format!("{}s", LEASE.as_secs());
    let mut doomed = ServerProcess::spawn(
        &["--cluster", &nats.url(), "--node", "doomed", "--cluster-lease", &lease],
        None,
    )
    .await;
    let (_frank, _frank_events) =
        within(Client::connect(&doomed.addr.to_string(), "frank")).await.unwrap();
    // A key holder there too: once the node is known dead, messages for her are stored.
    let (_gina, _gina_events) =
        within(Client::builder(doomed.addr.to_string(), "gina").identity(key(15)).connect())
            .await
            .unwrap();
    let (alice, mut alice_events) = n1.connect("alice").await;
    wait_until(|| lists(&n1, "frank") && lists(&n1, "gina")).await;
    assert!(matches!(
        Client::connect(&n1.url(), "frank").await,
        Err(ConnectError::NameTaken { .. })
    ));

    let killed = Instant::now();
    doomed.child.start_kill().unwrap();
    doomed.child.wait().await.unwrap();
    // Sent at once, while n1 still sees the node alive: forwarded, never acknowledged, so
    // its sender is told it was not delivered (or, if n1 already knows, NotFound).
    let id = alice.send("frank", "in flight").await.unwrap();
    match next_event(&mut alice_events).await {
        Event::Rejected { id: got, status: Status::NotDelivered, .. } if got == id => {}
        Event::NotFound { id: got, .. } if got == id => {}
        other => panic!("expected NotDelivered or NotFound, got {other:?}"),
    }
    // Within the lease, n1 stops routing to the dead node: a message is NotFound, never
    // sent into the void.
    wait_until(|| !lists(&n1, "frank")).await;
    let id = alice.send("frank", "are you there?").await.unwrap();
    assert_eq!(next_event(&mut alice_events).await, Event::NotFound { id, to: "frank".into() });
    wait_until(|| !lists(&n1, "gina")).await;
    let id = alice.send("gina", "kept for you").await.unwrap();
    assert_eq!(next_event(&mut alice_events).await, Event::Stored { id, to: "gina".into() });
    let (_gina, mut gina_events) =
        within(Client::builder(n1.url(), "gina").identity(key(15)).connect()).await.unwrap();
    assert_eq!(next_chat(&mut gina_events).await.1, "kept for you");
    // And the name can be claimed again.
    let reclaimed = within(async {
        loop {
            match Client::connect(&n1.url(), "frank").await {
                Ok((client, _events)) => return client,
                Err(ConnectError::NameTaken { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(other) => panic!("{other}"),
            }
        }
    })
    .await;
    println!("frank claimable again {:?} after the kill (lease {LEASE:?})", killed.elapsed());
    drop(reclaimed);
    n1.stop().await;
}

#[tokio::test]
async fn nats_restarting_mid_traffic_keeps_local_chat_and_refuses_cross_node_sends() {
    let mut nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    let (alice, mut alice_events) = n1.connect("alice").await;
    let (_carol, mut carol_events) = n1.connect("carol").await;
    let (_bob, mut bob_events) = n2.connect("bob").await;
    wait_until(|| lists(&n1, "bob")).await;
    alice.send("bob", "before").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await, ("alice".into(), "before".into()));

    nats.stop();
    // Cross-node sends get a typed refusal once the node knows NATS is gone (not a hang,
    // not silence). A message sent before it noticed is in the NATS client's buffer and
    // waits for the link to come back (see the mid-stream tests), so wait for the node to
    // notice first.
    wait_until(|| n1.handle.cluster_connected() == Some(false)).await;
    let id = alice.send("bob", "during").await.unwrap();
    match next_event(&mut alice_events).await {
        Event::Rejected { id: got, status: Status::NotDelivered, .. } if got == id => {}
        other => panic!("expected NotDelivered, got {other:?}"),
    }
    // Local chat goes on.
    alice.send("carol", "local still works").await.unwrap();
    assert_eq!(next_message(&mut carol_events).await, ("alice".into(), "local still works".into()));

    nats.start_again().await;
    // Once the nodes are back, cross-node chat resumes; every message is either delivered
    // or refused, none is lost without a word.
    let (mut sent, mut refused) = (0u64, 0u64);
    within(async {
        loop {
            let id = alice.send("bob", format!("after {id_hint}", id_hint = sent)).await.unwrap();
            sent += 1;
            tokio::select! {
                event = next_event(&mut alice_events) => match event {
                    Event::Rejected { id: got, .. } | Event::NotFound { id: got, .. } if got == id => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => panic!("unexpected {other:?}"),
                },
                (from, _) = next_message(&mut bob_events) => {
                    assert_eq!(from, "alice");
                    return;
                }
            }
        }
    })
    .await;
    println!("{sent} probes, {refused} refused while the nodes reconnected");
    // Names were re-asserted: bob's is still his, at n2.
    assert!(matches!(Client::connect(&n1.url(), "bob").await, Err(ConnectError::NameTaken { .. })));
    n1.stop().await;
    n2.stop().await;
}

/// A TCP proxy to NATS that can be cut, to partition one node from the cluster.
struct Partition {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    async fn to(nats: &Nats) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let port = nats.port;
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue; // dropped: refused while cut
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Partition { addr, cut }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

#[tokio::test]
async fn a_node_cut_off_past_its_lease_loses_its_names_and_disconnects_their_holders() {
    let nats = Nats::start().await;
    let n1 = node(&nats, "n1").await;
    let partition = Partition::to(&nats).await;
    let cut_node = node_via(partition.url(), "cut", Config::default()).await;

    let (_gina, mut gina_events) = within(Client::connect(&cut_node.url(), "gina")).await.unwrap();
    wait_until(|| lists(&n1, "gina")).await;
    partition.set_cut(true);
    // Past the lease, gina's name is free on n1, and someone takes it.
    let (_other, _other_events) = within(async {
        loop {
            match Client::connect(&n1.url(), "gina").await {
                Ok(client) => return client,
                Err(ConnectError::NameTaken { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(other) => panic!("{other}"),
            }
        }
    })
    .await;
    // When the node is back, it finds its name moved and disconnects its holder, saying why.
    partition.set_cut(false);
    match next_event(&mut gina_events).await {
        Event::Closed { status, detail } => {
            assert_eq!(status, Status::NameTaken);
            assert!(detail.contains("cut off"), "{detail}");
        }
        other => panic!("expected gina to be disconnected, got {other:?}"),
    }
    cut_node.stop().await;
    n1.stop().await;
}

/// The next chat message, skipping receipts and `Stored` notices; with its sequence number.
async fn next_chat(events: &mut relay_client::Events) -> (String, String, u64) {
    loop {
        match next_event(events).await {
            Event::Message { from, content, seq, .. } => {
                return (from.to_string(), String::from_utf8_lossy(&content).into_owned(), seq);
            }
            Event::Delivered { .. } | Event::Stored { .. } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Waits until `events` has said `Delivered` for every id in `ids` (anything else but
/// messages and `Stored` fails the test).
async fn receipts_for(events: &mut relay_client::Events, ids: &[u64]) {
    let mut missing: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    while !missing.is_empty() {
        match next_event(events).await {
            Event::Delivered { ids, .. } => {
                for id in ids {
                    missing.remove(&id);
                }
            }
            Event::Stored { .. } | Event::Message { .. } => {}
            other => panic!("expected receipts, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_inbox_filled_through_one_node_is_drained_at_another_exactly_once_in_order() {
    let nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    // Bob binds his name at n2, then leaves.
    let (bob, _events) =
        within(Client::builder(n2.url(), "bob").identity(key(7)).connect()).await.unwrap();
    within(bob.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "bob")).await;

    // Alice, at n1, sends while he is offline: every message is stored.
    let (alice, mut alice_events) =
        within(Client::builder(n1.url(), "alice").identity(key(8)).connect()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(alice.send("bob", format!("{i}")).await.unwrap());
    }
    for &id in &ids {
        match next_event(&mut alice_events).await {
            Event::Stored { id: got, .. } => assert_eq!(got, id),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    // Every node sees them (the console's `inboxes`).
    let totals = within(n2.handle.inboxes()).await.unwrap();
    assert_eq!((totals.recipients, totals.messages), (1, 300), "{totals:?}");
    // Then she leaves, and the node she stored through stops: nothing was kept there.
    within(alice.offline()).await.unwrap();
    n1.stop().await;

    // He logs in at n2: all of them, in order, once.
    let (bob, mut bob_events) =
        within(Client::builder(n2.url(), "bob").identity(key(7)).connect()).await.unwrap();
    let mut last = 0;
    for i in 0..300 {
        let (from, text, seq) = next_chat(&mut bob_events).await;
        assert_eq!((from.as_str(), text), ("alice", format!("{i}")));
        assert!(seq > last, "numbers only grow: {seq} after {last}");
        last = seq;
    }
    // Alice was offline: her receipts waited in her own inbox, for any node.
    let (alice, mut alice_events) =
        within(Client::builder(n2.url(), "alice").identity(key(8)).connect()).await.unwrap();
    receipts_for(&mut alice_events, &ids).await;
    alice.send("bob", "live now").await.unwrap();
    let (_, text, seq) = next_chat(&mut bob_events).await;
    assert_eq!(text, "live now");
    assert!(seq > last);

    // At a node started later: nothing is delivered twice, and what was stored meanwhile
    // comes first.
    within(bob.offline()).await.unwrap();
    wait_until(|| !lists(&n2, "bob")).await;
    let id = alice.send("bob", "while you were away").await.unwrap();
    loop {
        match next_event(&mut alice_events).await {
            Event::Stored { id: got, .. } if got == id => break,
            Event::Delivered { .. } => {}
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    let n3 = node(&nats, "n3").await;
    let (_bob, mut bob_events) =
        within(Client::builder(n3.url(), "bob").identity(key(7)).connect()).await.unwrap();
    let (_, text, _) = next_chat(&mut bob_events).await;
    assert_eq!(text, "while you were away");
    alice.send("bob", "and live at n3").await.unwrap();
    let (_, text, _) = next_chat(&mut bob_events).await;
    assert_eq!(text, "and live at n3");
    receipts_for(&mut alice_events, &[id]).await;

    // The operator's purge empties an inbox for every node.
    let (dora, _events) =
        within(Client::builder(n3.url(), "dora").identity(key(14)).connect()).await.unwrap();
    within(dora.offline()).await.unwrap();
    wait_until(|| !lists(&n2, "dora")).await;
    for i in 0..3 {
        alice.send("dora", format!("{i}")).await.unwrap();
    }
    let mut stored = 0;
    while stored < 3 {
        match next_event(&mut alice_events).await {
            Event::Stored { .. } => stored += 1,
            Event::Delivered { .. } => {}
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    assert_eq!(within(n3.handle.purge("dora")).await.unwrap(), 3);
    let (_dora, mut dora_events) =
        within(Client::builder(n2.url(), "dora").identity(key(14)).connect()).await.unwrap();
    alice.send("dora", "after the purge").await.unwrap();
    let (_, text, _) = next_chat(&mut dora_events).await;
    assert_eq!(text, "after the purge");
    for server in [n2, n3] {
        server.stop().await;
    }
}

#[tokio::test]
async fn two_nodes_storing_for_one_recipient_at_once_keep_each_senders_order() {
    let nats = Nats::start().await;
    let [n1, n2, n3] = three_nodes(&nats).await;
    let (carol, _events) =
        within(Client::builder(n3.url(), "carol").identity(key(9)).connect()).await.unwrap();
    within(carol.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "carol") && !lists(&n2, "carol")).await;

    let (a, mut a_events) =
        within(Client::builder(n1.url(), "a").identity(key(10)).connect()).await.unwrap();
    let (b, mut b_events) =
        within(Client::builder(n2.url(), "b").identity(key(11)).connect()).await.unwrap();
    // Both at once, so their appends race for carol's inbox.
    let send = |client: Client, tag: &'static str| async move {
        for i in 0..150 {
            client.send("carol", format!("{tag}{i}")).await.unwrap();
        }
    };
    tokio::join!(send(a.clone(), "a"), send(b.clone(), "b"));
    for events in [&mut a_events, &mut b_events] {
        for _ in 0..150 {
            match next_event(events).await {
                Event::Stored { .. } => {}
                other => panic!("expected Stored, got {other:?}"),
            }
        }
    }
    let (_carol, mut carol_events) =
        within(Client::builder(n3.url(), "carol").identity(key(9)).connect()).await.unwrap();
    let (mut next_a, mut next_b, mut last) = (0, 0, 0);
    for _ in 0..300 {
        let (from, text, seq) = next_chat(&mut carol_events).await;
        assert!(seq > last, "numbers only grow");
        last = seq;
        match from.as_str() {
            "a" => {
                assert_eq!(text, format!("a{next_a}"));
                next_a += 1;
            }
            "b" => {
                assert_eq!(text, format!("b{next_b}"));
                next_b += 1;
            }
            other => panic!("from {other}"),
        }
    }
    assert_eq!((next_a, next_b), (150, 150));
    for server in [n1, n2, n3] {
        server.stop().await;
    }
}

/// Waits for one answer per message sent: (stored, refused as `InboxFull`).
async fn fates(events: &mut relay_client::Events, sent: usize) -> (usize, usize) {
    let (mut stored, mut full) = (0, 0);
    while stored + full < sent {
        match next_event(events).await {
            Event::Stored { .. } => stored += 1,
            Event::Rejected { status: Status::InboxFull, .. } => full += 1,
            other => panic!("expected Stored or InboxFull, got {other:?}"),
        }
    }
    (stored, full)
}

#[tokio::test]
async fn an_inbox_limit_holds_exactly_while_two_nodes_store_for_it_at_once() {
    let nats = Nats::start().await;
    let limited = || Config {
        inbox: relay_server::InboxLimits { messages: 100, ..Default::default() },
        ..Config::default()
    };
    let n1 = node_with(&nats, "n1", limited()).await;
    let n2 = node_with(&nats, "n2", limited()).await;
    let (carol, _events) =
        within(Client::builder(n2.url(), "carol").identity(key(9)).connect()).await.unwrap();
    within(carol.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "carol") && !lists(&n2, "carol")).await;

    let (a, mut a_events) =
        within(Client::builder(n1.url(), "a").identity(key(10)).connect()).await.unwrap();
    let (b, mut b_events) =
        within(Client::builder(n2.url(), "b").identity(key(11)).connect()).await.unwrap();
    // 300 messages race for 100 places, each node counting the inbox as it goes.
    let send = |client: Client| async move {
        for i in 0..150 {
            client.send("carol", format!("{i}")).await.unwrap();
        }
    };
    tokio::join!(send(a.clone()), send(b.clone()));
    let (a_stored, a_full) = fates(&mut a_events, 150).await;
    let (b_stored, b_full) = fates(&mut b_events, 150).await;
    assert_eq!(a_stored + b_stored, 100, "a {a_stored}/{a_full}, b {b_stored}/{b_full}");
    let totals = within(n1.handle.inboxes()).await.unwrap();
    assert_eq!(totals.messages, 100, "{totals:?}");

    // Room made at one node is room at the other: once the operator empties the inbox, a
    // node that counted it full stores again (its count is confirmed before it refuses).
    assert_eq!(within(n2.handle.purge("carol")).await.unwrap(), 100);
    a.send("carol", "after the purge").await.unwrap();
    loop {
        match fates(&mut a_events, 1).await {
            (1, 0) => break,
            // Counted full less than a quarter second before the purge: try again.
            _ => a.send("carol", "after the purge").await.unwrap(),
        };
    }
    let (_carol, mut carol_events) =
        within(Client::builder(n1.url(), "carol").identity(key(9)).connect()).await.unwrap();
    let (_, text, _) = next_chat(&mut carol_events).await;
    assert_eq!(text, "after the purge");
    for server in [n1, n2] {
        server.stop().await;
    }
}

#[tokio::test]
async fn receipts_for_live_messages_travel_back_across_nodes() {
    let nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    let (dave, mut dave_events) =
        within(Client::builder(n2.url(), "dave").identity(key(12)).connect()).await.unwrap();
    let (erin, mut erin_events) =
        within(Client::builder(n1.url(), "erin").identity(key(13)).connect()).await.unwrap();
    wait_until(|| lists(&n1, "dave") && lists(&n2, "erin")).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(erin.send("dave", format!("{i}")).await.unwrap());
    }
    for i in 0..50 {
        let (_, text, _) = next_chat(&mut dave_events).await;
        assert_eq!(text, format!("{i}"));
    }
    receipts_for(&mut erin_events, &ids).await;
    drop(dave);
    for server in [n1, n2] {
        server.stop().await;
    }
}

#[tokio::test]
async fn a_stored_message_too_old_is_removed_and_its_sender_told_once() {
    let nats = Nats::start().await;
    let mut config = Config { inbox_sweep: Duration::from_millis(100), ..Config::default() };
    config.inbox.max_age_ms = 300;
    // Both nodes sweep the same stream.
    let n1 = node_with(&nats, "n1", config.clone()).await;
    let n2 = node_with(&nats, "n2", config).await;
    let (hank, _events) =
        within(Client::builder(n2.url(), "hank").identity(key(16)).connect()).await.unwrap();
    within(hank.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "hank")).await;
    let (alice, mut alice_events) = n1.connect("alice").await;
    let id = alice.send("hank", "too late").await.unwrap();
    assert_eq!(next_event(&mut alice_events).await, Event::Stored { id, to: "hank".into() });
    match next_event(&mut alice_events).await {
        Event::Rejected { id: got, status: Status::Expired, .. } => assert_eq!(got, id),
        other => panic!("expected Expired, got {other:?}"),
    }
    // It is gone for every node: hank's first message is the next one.
    let (_hank, mut hank_events) =
        within(Client::builder(n1.url(), "hank").identity(key(16)).connect()).await.unwrap();
    let id = alice.send("hank", "fresh").await.unwrap();
    assert_eq!(next_chat(&mut hank_events).await.1, "fresh");
    // And alice heard of the expiry once: the next thing she hears is this message's receipt
    // or nothing at all, never a second Expired.
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(500), alice_events.next()).await {
        assert!(!matches!(event, Some(Event::Rejected { .. })), "{event:?} after {id}");
    }
    for server in [n1, n2] {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holder_falling_behind_messages_from_another_node_gets_them_later_from_its_inbox() {
    let nats = Nats::start().await;
    let config = Config {
        outbox_bytes: 128 * 1024,
        send_wait: Duration::from_millis(100),
        // Not read for a while on purpose: not a slow consumer to drop.
        write_timeout: Duration::from_secs(120),
        ..Config::default()
    };
    let n1 = node_with(&nats, "n1", config.clone()).await;
    let n2 = node_with(&nats, "n2", config).await;
    let (_bob, mut bob_events) =
        within(Client::builder(n2.url(), "bob").identity(key(17)).connect()).await.unwrap();
    let (alice, mut alice_events) =
        within(Client::builder(n1.url(), "alice").identity(key(18)).connect()).await.unwrap();
    wait_until(|| lists(&n1, "bob")).await;
    // Bob takes nothing while alice, on the other node, sends far more than his outbox, the
    // kernel's buffers, his client's queue and the link's window hold (32 MiB).
    const N: usize = 2000;
    let filler = "x".repeat(16 * 1024);
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        ids.push(alice.send("bob", format!("{i:05} {filler}")).await.unwrap());
    }
    // What did not fit went to his inbox rather than being refused.
    within(async {
        while within(n2.handle.inboxes()).await.unwrap().messages == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Bob catches up: every message once, in the order sent.
    let mut last = 0;
    for i in 0..N {
        let (from, text, seq) = next_chat(&mut bob_events).await;
        assert_eq!(from, "alice");
        assert_eq!(&text[..5], format!("{i:05}"), "message {i} out of order");
        assert!(seq > last, "numbers only grow");
        last = seq;
    }
    // And alice hears that each was delivered; none was refused.
    let mut missing: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    while !missing.is_empty() {
        match next_event(&mut alice_events).await {
            Event::Delivered { ids, .. } => {
                for id in ids {
                    missing.remove(&id);
                }
            }
            other => panic!("alice was told {other:?}"),
        }
    }
    for server in [n1, n2] {
        server.stop().await;
    }
}

#[tokio::test]
async fn stored_messages_survive_nats_being_killed_and_a_store_during_the_outage_is_refused() {
    let mut nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    let (ivy, _events) =
        within(Client::builder(n2.url(), "ivy").identity(key(19)).connect()).await.unwrap();
    within(ivy.offline()).await.unwrap();
    wait_until(|| !lists(&n1, "ivy")).await;
    let (alice, mut alice_events) = n1.connect("alice").await;
    for i in 0..50 {
        let id = alice.send("ivy", format!("{i}")).await.unwrap();
        assert_eq!(next_event(&mut alice_events).await, Event::Stored { id, to: "ivy".into() });
    }
    // NATS killed (SIGKILL): a message for ivy now gets a typed refusal, never Stored.
    nats.stop();
    let id = alice.send("ivy", "during").await.unwrap();
    match next_event(&mut alice_events).await {
        Event::Rejected { id: got, status: Status::NotDelivered, .. } if got == id => {}
        Event::NotFound { id: got, .. } if got == id => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    nats.start_again().await;
    // Every message acknowledged as stored before the kill is still there.
    let (_ivy, mut ivy_events) = within(async {
        loop {
            match Client::builder(n2.url(), "ivy").identity(key(19)).connect().await {
                Ok(connected) => return connected,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    for i in 0..50 {
        assert_eq!(next_chat(&mut ivy_events).await.1, format!("{i}"));
    }
    n1.stop().await;
    n2.stop().await;
}

/// NATS killed and restarted in the middle of a stream of cross-node messages: every message
/// is either delivered (once) or refused to its sender, never both and never neither, even
/// those that were on their way when NATS went down.
#[tokio::test]
async fn nats_killed_mid_stream_leaves_every_cross_node_message_delivered_or_refused() {
    nats_killed_mid_stream(Duration::from_secs(1)).await;
}

/// The same with NATS gone longer than a forwarded message may wait for its acknowledgement
/// (5 s): what was on its way when NATS went down must not be refused and then delivered.
#[tokio::test]
async fn nats_gone_longer_than_the_ack_timeout_leaves_no_message_both_refused_and_delivered() {
    nats_killed_mid_stream(Duration::from_secs(6)).await;
}

async fn nats_killed_mid_stream(outage: Duration) {
    let mut nats = Nats::start().await;
    let [n1, n2] = [node(&nats, "n1").await, node(&nats, "n2").await];
    let (alice, alice_events) = n1.connect("alice").await;
    let (_bob, bob_events) = n2.connect("bob").await;
    wait_until(|| lists(&n1, "bob")).await;
    let mut fates = Fates::watch(alice_events, bob_events);

    // A steady stream, going on while NATS dies (a second in) and comes back (a second later).
    let down = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        nats.stop();
        tokio::time::sleep(outage).await;
        nats.start_again().await;
        nats
    });
    let started = Instant::now();
    while started.elapsed() < outage + Duration::from_secs(3) {
        fates.send_some(&alice, "bob").await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _nats = within(down).await.unwrap();
    // Every message's fate is known once the unacknowledged ones have timed out.
    let outcome = fates.settle(Duration::from_secs(30)).await;
    assert!(
        outcome.in_time && outcome.silent.is_empty(),
        "lost without a word: {:?}",
        outcome.silent
    );
    assert!(outcome.both.is_empty(), "refused, yet delivered: {:?}", outcome.both);
    assert!(!outcome.duplicated, "a message was delivered twice");
    n1.stop().await;
    n2.stop().await;
}

/// A stream of numbered messages from a sender to a receiver, and the fate of each: delivered
/// (the receiver got it) or refused (the sender was told).
struct Fates {
    /// Each message's id, with its number (its content).
    sent: std::collections::HashMap<u64, u64>,
    /// The numbers the receiver got, in order.
    delivered: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    /// The ids the sender was told were not delivered.
    refused: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    readers: [tokio::task::JoinHandle<()>; 2],
}

/// What [`Fates::settle`] found.
struct Outcome {
    /// Every message was delivered or refused in time.
    in_time: bool,
    /// Numbers neither delivered nor refused.
    silent: Vec<u64>,
    /// Numbers both delivered and refused.
    both: Vec<u64>,
    refused: usize,
    /// A number was delivered more than once.
    duplicated: bool,
}

impl Fates {
    /// Follows the sender's and the receiver's events (content that is not a number, a probe
    /// say, is not counted).
    fn watch(mut sender: relay_client::Events, mut receiver: relay_client::Events) -> Fates {
        let delivered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let refused = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (got, told) = (delivered.clone(), refused.clone());
        let receiving = tokio::spawn(async move {
            while let Some(event) = receiver.next().await {
                if let Event::Message { content, .. } = event
                    && let Ok(n) = std::str::from_utf8(&content).unwrap_or("").parse::<u64>()
                {
                    got.lock().unwrap().push(n);
                }
            }
        });
        let sending = tokio::spawn(async move {
            while let Some(event) = sender.next().await {
                if let Event::Rejected { id, .. } | Event::NotFound { id, .. } = event {
                    told.lock().unwrap().insert(id);
                }
            }
        });
        Fates { sent: Default::default(), delivered, refused, readers: [receiving, sending] }
    }

    /// Sends the next 20 numbers to `to`.
    async fn send_some(&mut self, client: &Client, to: &str) {
        for _ in 0..20 {
            let n = self.sent.len() as u64;
            self.sent.insert(client.send(to, n.to_string()).await.unwrap(), n);
        }
    }

    /// Waits up to `wait` until every message was delivered or refused, then says how it
    /// went (and prints it).
    async fn settle(self, wait: Duration) -> Outcome {
        let accounted = || {
            let (delivered, refused) =
                (self.delivered.lock().unwrap(), self.refused.lock().unwrap());
            self.sent.iter().all(|(id, n)| delivered.contains(n) || refused.contains(id))
        };
        let in_time = tokio::time::timeout(wait, async {
            while !accounted() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok();
        for reader in &self.readers {
            reader.abort();
        }
        let list = self.delivered.lock().unwrap().clone();
        let delivered: std::collections::HashSet<u64> = list.iter().copied().collect();
        let refused = self.refused.lock().unwrap().clone();
        let (mut silent, mut both) = (Vec::new(), Vec::new());
        for (id, n) in &self.sent {
            match (delivered.contains(n), refused.contains(id)) {
                (false, false) => silent.push(*n),
                (true, true) => both.push(*n),
                _ => {}
            }
        }
        println!(
            "{} sent, {} delivered, {} refused, {} neither after {wait:?}, {} both",
            self.sent.len(),
            delivered.len(),
            refused.len(),
            silent.len(),
            both.len()
        );
        let duplicated = delivered.len() != list.len();
        Outcome { in_time, silent, both, refused: refused.len(), duplicated }
    }
}

/// Connects alice at `n1` and bob at `n2`, and waits until a message from alice reaches bob
/// (n1's view has him); returns alice and the fates of what she sends bob from then on.
async fn alice_to_bob(n1: &TestServer, n2: &TestServer) -> (Client, Client, Fates) {
    let (alice, mut alice_events) = within(Client::connect(&n1.url(), "alice")).await.unwrap();
    let (bob, mut bob_events) = n2.connect("bob").await;
    wait_until(|| lists(n2, "alice")).await;
    let probe = alice.send("bob", "probe").await.unwrap();
    loop {
        tokio::select! {
            event = next_event(&mut alice_events) => match event {
                Event::NotFound { id, .. } if id == probe => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    alice.send("bob", "probe").await.unwrap();
                }
                other => panic!("unexpected {other:?}"),
            },
            (_, text) = next_message(&mut bob_events) => if text == "probe" { break },
        }
    }
    (alice, bob, Fates::watch(alice_events, bob_events))
}

/// A TCP proxy to NATS that can silently drop what a node sends, as a connection that dies
/// with bytes written into it does, and then reset the connection (the node reconnects); or
/// hold what it sends and pass it on later, as a stalled connection does.
struct Lossy {
    addr: std::net::SocketAddr,
    dropping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reset: tokio::sync::watch::Sender<u64>,
}

impl Lossy {
    async fn to(nats: &Nats) -> Lossy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dropping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reset, reset_rx) = tokio::sync::watch::channel(0u64);
        let (port, drop_flag, hold_flag) = (nats.port, dropping.clone(), holding.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (mut reset_rx, dropping) = (reset_rx.clone(), drop_flag.clone());
                let holding = hold_flag.clone();
                reset_rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    let (mut client_r, mut client_w) = client.into_split();
                    let (mut server_r, mut server_w) = server.into_split();
                    let up = async {
                        let (mut buf, mut held) = (vec![0u8; 64 * 1024], Vec::new());
                        loop {
                            // Looks at the flags at least every 20 ms, so what is held goes
                            // on when released even if the node sends nothing more.
                            let read = tokio::time::timeout(
                                Duration::from_millis(20),
                                client_r.read(&mut buf),
                            );
                            let n = match read.await {
                                Ok(read) => match read.unwrap_or(0) {
                                    0 => return,
                                    n => n,
                                },
                                Err(_) => 0,
                            };
                            if holding.load(Ordering::Relaxed) {
                                held.extend_from_slice(&buf[..n]);
                                continue;
                            }
                            if !held.is_empty() && server_w.write_all(&held).await.is_err() {
                                return;
                            }
                            held.clear();
                            if !dropping.load(Ordering::Relaxed)
                                && server_w.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        () = up => {}
                        _ = tokio::io::copy(&mut server_r, &mut client_w) => {}
                        _ = reset_rx.changed() => {}
                    }
                });
            }
        });
        Lossy { addr, dropping, holding, reset }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

/// Messages a node forwarded into a NATS connection that then died without passing them on
/// are reported to their senders as not delivered, although the node reconnects at once and
/// the other node acknowledges what comes after them (an acknowledgement covers every number
/// up to its own, so without the gap it reports they would pass as taken in).
#[tokio::test]
async fn messages_lost_in_a_dying_nats_connection_are_reported_to_their_senders() {
    use std::sync::atomic::Ordering;
    let nats = Nats::start().await;
    let n2 = node(&nats, "n2").await;
    let lossy = Lossy::to(&nats).await;
    let n1 = node_via(lossy.url(), "n1", Config::default()).await;
    let (alice, _bob, mut fates) = alice_to_bob(&n1, &n2).await;

    // A steady stream; for 300 ms of it, what n1 sends NATS vanishes, then its connection
    // is reset (it reconnects at once).
    let started = Instant::now();
    let (mut dropped, mut reset) = (false, false);
    while started.elapsed() < Duration::from_millis(1500) {
        fates.send_some(&alice, "bob").await;
        if !dropped && started.elapsed() > Duration::from_millis(300) {
            lossy.dropping.store(true, Ordering::Relaxed);
            dropped = true;
        }
        if !reset && started.elapsed() > Duration::from_millis(600) {
            lossy.dropping.store(false, Ordering::Relaxed);
            lossy.reset.send_modify(|r| *r += 1);
            reset = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Well within the 5 s after which an unacknowledged message is refused anyway: the gap
    // is what tells.
    let outcome = fates.settle(Duration::from_secs(4)).await;
    assert!(outcome.refused > 0, "nothing was lost: the test did not drop anything");
    assert!(outcome.in_time, "not delivered and not refused: {:?}", outcome.silent);
    assert_eq!(outcome.both.len(), 0, "refused, yet delivered");
    n1.stop().await;
    n2.stop().await;
}

/// A node's connection to NATS stalls, holding what it sends, past the outage wait (3 s here),
/// then goes on. The senders of the messages held were told they were not delivered while
/// the stall lasted; when those messages reach the other node at last, it drops them (they
/// carry a deadline) rather than deliver them too.
#[tokio::test]
async fn messages_held_in_a_stalled_link_past_the_outage_wait_are_refused_not_also_delivered() {
    use std::sync::atomic::Ordering;
    let nats = Nats::start().await;
    let cluster = |url: String, name: &str| {
        // A lease longer than the stall: the node is not taken for dead meanwhile.
        ClusterConfig::new(url, name)
            .lease(Duration::from_secs(20))
            .outage_wait(Duration::from_secs(3))
    };
    let n2 = node_in(cluster(nats.url(), "n2"), Config::default()).await;
    let lossy = Lossy::to(&nats).await;
    let n1 = node_in(cluster(lossy.url(), "n1"), Config::default()).await;
    let (alice, _bob, mut fates) = alice_to_bob(&n1, &n2).await;

    let started = Instant::now();
    let (mut held, mut released) = (false, false);
    while started.elapsed() < Duration::from_millis(5500) {
        fates.send_some(&alice, "bob").await;
        if !held && started.elapsed() > Duration::from_millis(300) {
            lossy.holding.store(true, Ordering::Relaxed);
            held = true;
        }
        if !released && started.elapsed() > Duration::from_millis(4300) {
            lossy.holding.store(false, Ordering::Relaxed);
            released = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = fates.settle(Duration::from_secs(20)).await;
    assert!(outcome.refused > 0, "nothing was refused: the stall did not hold anything long");
    assert!(outcome.in_time, "not delivered and not refused: {:?}", outcome.silent);
    assert!(outcome.both.is_empty(), "refused, yet delivered: {:?}", outcome.both);
    assert!(!outcome.duplicated, "a message was delivered twice");
    n1.stop().await;
    n2.stop().await;
}

/// A guest receiver whose connection is dropped with forwarded messages still queued for it:
/// their sender, on another node, is told each was not delivered, as a sender on the same
/// node is.
#[tokio::test]
async fn a_receiver_dropped_with_forwarded_messages_queued_has_their_sender_told() {
    use bytes::Bytes;
    let nats = Nats::start().await;
    let n1 = node(&nats, "n1").await;
    let config = Config {
        outbox_bytes: 256 * 1024,
        write_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let n2 = node_with(&nats, "n2", config).await;
    let sink = RawPeer::connect_small_buffer(n2.addr).await.register_as("sink").await;
    let (alice, mut alice_events) = n1.connect("alice").await;
    wait_until(|| lists(&n1, "sink")).await;

    // Flood the sink (it reads nothing) until it is dropped as a slow consumer; whatever was
    // queued for it then is reported back across the cluster (the reports may come after
    // the sink is gone from n1's view, so they are waited for).
    let payload = Bytes::from(vec![b'x'; 32 * 1024]);
    let mut stranded = 0;
    let mut gone = false;
    within(async {
        while stranded == 0 {
            if !gone {
                alice.send("sink", payload.clone()).await.unwrap();
            }
            let event = match alice_events.try_next() {
                Some(event) => event,
                None if gone => next_event(&mut alice_events).await,
                None => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
            };
            match event {
                Event::Rejected { status: Status::NotDelivered, detail, .. } => {
                    if detail.contains("disconnected") {
                        stranded += 1;
                    }
                }
                Event::NotFound { .. } => gone = true,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    drop(sink);
    assert!(stranded > 0, "the sender was not told about the messages stranded at the other node");
    n1.stop().await;
    n2.stop().await;
}

/// A node cut off from NATS for longer than a forwarded message waits for its
/// acknowledgement (5 s), in the middle of a stream to another node: the messages that
/// reached the other node just before the cut (their acknowledgements lost with the
/// connection) must not be refused to their sender, and those lost with the connection must
/// be; every message is one or the other once the node is back.
#[tokio::test]
async fn a_node_cut_off_longer_than_the_ack_timeout_tells_each_sender_the_true_fate() {
    let nats = Nats::start().await;
    let n2 = node(&nats, "n2").await;
    let partition = Partition::to(&nats).await;
    let n1 = node_via(partition.url(), "n1", Config::default()).await;
    let (alice, _bob, mut fates) = alice_to_bob(&n1, &n2).await;

    // A steady stream, cut off half a second in, for 6 s.
    let started = Instant::now();
    let (mut cut, mut healed) = (false, false);
    while started.elapsed() < Duration::from_millis(7500) {
        fates.send_some(&alice, "bob").await;
        if !cut && started.elapsed() > Duration::from_millis(500) {
            partition.set_cut(true);
            cut = true;
        }
        if !healed && started.elapsed() > Duration::from_millis(6500) {
            partition.set_cut(false);
            healed = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = fates.settle(Duration::from_secs(30)).await;
    assert!(outcome.in_time, "not delivered and not refused: {:?}", outcome.silent);
    assert!(outcome.both.is_empty(), "refused, yet delivered: {:?}", outcome.both);
    n1.stop().await;
    n2.stop().await;
}
