//! The peer process of the lazy-restore tests: Firecracker's side of the UFFD handshake (or a
//! KVM guest, or an abrupt client), in its own process as in production. The tests spawn it with
//! a JSON role in `$SNAPFORK_TEST_CHILD` (see `tests/common/mod.rs`, `child_main`).

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    common::child_main();
}
