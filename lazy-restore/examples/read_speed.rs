//! Measures how fast a stored image's pages read back (page ids, then verified pages).
//! `cargo run --release -p snapfork-lazy-restore --example read_speed -- STORE REF`

use snapfork_store::{OpenOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, name] = &args[..] else {
        return Err("usage: read_speed STORE REF".into());
    };
    let store = Store::open(store, OpenOptions { read_only: true, ..Default::default() })?;
    let r = store.open_image_ref(name)?;
    let t = std::time::Instant::now();
    let ids: Vec<_> = (0..r.page_count()).map(|i| r.page_id(i)).collect::<Result<_, _>>()?;
    let t_ids = t.elapsed();
    let mut buf = vec![0u8; r.page_size() as usize];
    let t = std::time::Instant::now();
    let mut n = 0u64;
    for (i, id) in ids.iter().enumerate() {
        if !id.is_zero() {
            r.read_page_with_id(i as u64, id, &mut buf)?;
            n += 1;
        }
    }
    let d = t.elapsed();
    println!(
        "{} page ids in {:?}; {n} pages read in {:?}: {:.1} us/page, {:.0} MB/s",
        ids.len(),
        t_ids,
        d,
        d.as_secs_f64() * 1e6 / n as f64,
        n as f64 * 4096.0 / d.as_secs_f64() / 1e6
    );
    Ok(())
}
