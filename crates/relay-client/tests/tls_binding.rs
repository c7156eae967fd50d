//! A machine in the middle that terminates the client's TLS and opens its own session to the
//! server cannot pass a key holder's login on: the signature covers the client's TLS session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use relay_client::{Client, ClientConfig, ConnectError, Identity, Tls};
use relay_server::{Config, Server};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// A proxy with its own certificate: it accepts the client's TLS, connects to the server over
/// TLS (pinned), and copies bytes both ways.
async fn man_in_the_middle(server: String, server_pin: String, own: relay_server::Tls) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let upstream = Tls::pinned(&server_pin).unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (own, server, upstream) = (own.clone(), server.clone(), upstream.clone());
            tokio::spawn(async move {
                let mut from_client = own.acceptor().accept(client).await.unwrap();
                let tcp = TcpStream::connect(&server).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut to_server = upstream.connector().connect(name, tcp).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut from_client, &mut to_server).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_login_relayed_through_another_tls_session_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    let (tls, _) =
        relay_server::Tls::self_signed(&dir.path().join("server"), &["localhost".into()]).unwrap();
    let pin = tls.fingerprint().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, config).unwrap().with_tls(tls);
    let addr = server.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));

    // Directly: alice's key works over TLS.
    let key = Identity::from_seed(&[5; 32]);
    let direct = ClientConfig {
        identity: Some(key.clone()),
        tls: Some(Tls::pinned(&pin).unwrap()),
        ..ClientConfig::default()
    };
    let (alice, _) = tokio::time::timeout(WAIT, Client::connect_with(&addr, "alice", direct))
        .await
        .unwrap()
        .unwrap();
    alice.offline().await.unwrap();

    // Through the middle (which the client trusts, as a victim of it would): refused.
    let (own, _) =
        relay_server::Tls::self_signed(&dir.path().join("mitm"), &["localhost".into()]).unwrap();
    let own_pin = own.fingerprint().to_string();
    let middle = man_in_the_middle(addr.clone(), pin.clone(), own).await;
    let relayed = ClientConfig {
        identity: Some(key),
        tls: Some(Tls::pinned(&own_pin).unwrap()),
        ..ClientConfig::default()
    };
    let refused =
        tokio::time::timeout(WAIT, Client::connect_with(&middle, "alice", relayed)).await.unwrap();
    assert!(matches!(refused, Err(ConnectError::AuthFailed { .. })), "{refused:?}");
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}
