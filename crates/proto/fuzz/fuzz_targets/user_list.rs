//! Fuzzes the user-list parser a client runs on what a server sends: any content in a `Users`
//! message gives a listing (never a panic), and a listing the server builds reads back as
//! the users it was built from.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_proto::{Kind, Message, ServerEvent};

fuzz_target!(|data: &[u8]| {
    let msg =
        Message { kind: Kind::Users, content: Bytes::copy_from_slice(data), ..Message::ping(1) };
    let _ = ServerEvent::parse(msg);

    // Lines of `name address` from the input, listed and parsed back.
    let text = String::from_utf8_lossy(data);
    let users: Vec<(&str, String)> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(name, addr)| {
            relay_proto::validate_name(name).is_ok()
                && !addr.contains('\n')
                && !addr.contains(' ')
                && !addr.contains('\r')
                && !addr.is_empty()
        })
        .map(|(name, addr)| (name, addr.to_string()))
        .collect();
    let mut listed = Vec::new();
    for part in Message::user_list(1, users.iter().map(|(n, a)| (*n, a.clone())), 256, None) {
        match ServerEvent::parse(part) {
            Ok(ServerEvent::Users { users, .. }) => listed.extend(users),
            other => panic!("a server-built listing did not parse: {other:?}"),
        }
    }
    let back: Vec<(&str, &str)> =
        listed.iter().map(|u| (u.name.as_str(), u.addr.as_str())).collect();
    let sent: Vec<(&str, &str)> = users.iter().map(|(n, a)| (*n, a.as_str())).collect();
    assert_eq!(back, sent);
});
