//! How fast a stored working set's pages stream into a page cache, with nothing else running:
//! `preload_speed STORE REF [--cold]` (the image must have a stored working set).

use std::sync::Arc;

use snapfork_lazy_restore::{CachedSource, StoreSource, workingset};
use snapfork_store::{OpenOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, reference) = (args.get(1).ok_or("STORE")?, args.get(2).ok_or("REF")?);
    let store = Store::open(dir, OpenOptions { read_only: true, create: false, ..Default::default() })?;
    let reader = store.open_image_ref(reference)?;
    let name = workingset::pages_ref_name(&reader.id());
    for round in 0..3 {
        if args.iter().any(|a| a == "--cold") {
            for e in std::fs::read_dir(store.dir().join("packs"))? {
                let f = std::fs::File::open(e?.path())?;
                use std::os::fd::AsRawFd;
                // SAFETY: fadvise on a descriptor we own; no memory is passed.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
        let cache = CachedSource::new(Arc::new(StoreSource::new(store.open_image(&reader.id())?)), 1 << 30);
        let r = workingset::preload(&store, &reader, &name, &cache)?.ok_or("no working-set pages stored")?;
        println!("round {round}: {} pages ({} MiB) in {:.1} ms", r.pages, (r.pages * 4096) >> 20, r.ms);
    }
    Ok(())
}
