//! Registry lookups, alone and under contention (another thread looking up and a third
//! registering and leaving all the time): `cargo bench -p relay-server`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use relay_server::bench_support::Names;

const USERS: usize = 10_000;

fn lookups(names: &Names, keys: &[String], iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(names.lookup(black_box(&keys[i as usize % keys.len()])));
    }
    start.elapsed()
}

fn routing(c: &mut Criterion) {
    let names = Arc::new(Names::new(USERS));
    let keys: Arc<Vec<String>> = Arc::new((0..USERS).map(|i| format!("user{i}")).collect());
    let mut group = c.benchmark_group("registry");
    group.bench_function("lookup", |b| b.iter_custom(|iters| lookups(&names, &keys, iters)));

    // Contention on a two-core machine: a second thread looks up the same names without
    // pause and registers and unregisters a name (the write lock) every 100 lookups, as a
    // busy server's other connections do, while the measured thread looks up.
    group.bench_function("lookup_contended", |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (names, keys, stop) = (names.clone(), keys.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        lookups(&names, &keys, 100);
                        if let Some(token) = names.register("newcomer", USERS + i) {
                            names.unregister("newcomer", token);
                        }
                        i += 1;
                    }
                })
            };
            let elapsed = lookups(&names, &keys, iters);
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            elapsed
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
