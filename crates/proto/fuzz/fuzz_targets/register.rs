//! Fuzzes what version 2 added for registering: the greeting parser (what a client reads
//! from a server), the credentials check (what a server reads from a client), and the name
//! rules on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::{Greeting, NONCE_LEN, Request, decode_body, name_key, verify_credentials};

fuzz_target!(|data: &[u8]| {
    // Greeting content: anything parsed must print and parse back to the same greeting.
    if let Ok(greeting) = Greeting::parse(data) {
        let again = Greeting::parse(greeting.to_content().as_bytes());
        assert_eq!(again.as_ref(), Ok(&greeting), "greeting does not round-trip");
    }

    // Credentials against a nonce and a name taken from the input: never panics, and bytes
    // that are not 96 long are always refused.
    let nonce = [data.first().copied().unwrap_or(0); NONCE_LEN];
    let (name, credentials) = data.split_at(data.len().min(16));
    let name = String::from_utf8_lossy(name);
    let verified = verify_credentials(&nonce, &name, credentials);
    if credentials.len() != relay_proto::CREDENTIALS_LEN {
        assert!(verified.is_err());
    }

    // The name rules: a valid name's canonical form is valid and its own canonical form.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(key) = name_key(text)
    {
        let again = name_key(&key.canonical).expect("a canonical form is a valid name");
        assert_eq!(again.canonical, key.canonical, "canonical form is not a fixed point");
    }

    // A registration built from the input, as the server reads it.
    if let Ok(msg) = decode_body(data) {
        if let Ok(Request::Register { name, credentials: Some(c), .. }) =
            Request::parse(msg.as_ref())
        {
            let _ = verify_credentials(&nonce, name, c);
        }
    }
});
