//! The machine of a power-cut test (see `snapfork_tests::power_cut`), run by the test as a
//! process of its own:
//!
//! - `power-cut-machine store MOUNT INPUTS`: commits, an uncommitted transaction, the cut;
//! - `power-cut-machine busy MOUNT SCRATCH ROUND AFTER_MS`: ingests, checkpoints and gc at once,
//!   cut `AFTER_MS` after the first commit;
//! - `power-cut-machine engine MOUNT`: a raw sandbox checkpointed twice and reverted, then cut.

use std::path::Path;

use snapfork_tests::power_cut;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args[..] {
        ["store", mount, inputs] => power_cut::store_machine(Path::new(mount), Path::new(inputs)),
        ["busy", mount, scratch, round, after_ms] => power_cut::busy_machine(
            Path::new(mount),
            Path::new(scratch),
            round.parse().expect("ROUND"),
            after_ms.parse().expect("AFTER_MS"),
        ),
        ["engine", mount] => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
            rt.expect("tokio runtime").block_on(power_cut::engine_machine(Path::new(mount)))
        }
        _ => {
            eprintln!("usage: power-cut-machine store MOUNT INPUTS | busy MOUNT SCRATCH ROUND AFTER_MS | engine MOUNT");
            std::process::exit(2);
        }
    }
}
