//! Ingests a raw memory image into a store under a ref (until the CLI has `snapfork ingest`):
//! `cargo run -p snapfork-lazy-restore --example ingest_image -- STORE FILE REF`.

use snapfork_store::{IngestOptions, OpenOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, file, name] = &args[..] else {
        return Err("usage: ingest_image STORE FILE REF".into());
    };
    let store = Store::open(store, OpenOptions::default())?;
    let t = std::time::Instant::now();
    let info = store.ingest_image(file.as_ref(), &IngestOptions::default(), Some(name))?;
    println!(
        "{} {} bytes, {} pages ({} zero) in {:.2}s",
        info.id,
        info.size,
        info.pages,
        info.zero_pages,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
