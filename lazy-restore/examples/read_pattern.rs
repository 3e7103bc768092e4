//! Per-page read costs of a stored image for a random 10% working set (the one `snapfork bench
//! restore` uses) and for a sequential pass: fresh reader vs warm locations, the reader vs
//! `StoreSource`. `cargo run --release -p snapfork-lazy-restore --example read_pattern -- STORE REF`
use snapfork_store::{OpenOptions, Store};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let store = Store::open(&args[0], OpenOptions { read_only: true, ..Default::default() })?;
    let name = &args[1];
    let r0 = store.open_image_ref(name)?;
    let ws = snapfork_lazy_restore::workingset::random(r0.page_count(), 0.1, 1);
    let ids: Vec<_> = ws.iter().map(|&i| r0.page_id(i).unwrap()).collect();
    let nz: Vec<(u64, _)> = ws.iter().copied().zip(ids.iter().copied()).filter(|(_, id)| !id.is_zero()).collect();
    let mut runs = Vec::new();
    for &p in &ws {
        match runs.last_mut() {
            Some((a, n)) if *a + *n == p => *n += 1,
            _ => runs.push((p, 1u64)),
        }
    }
    println!("ws {} pages, {} non-zero, {} runs", ws.len(), nz.len(), runs.len());
    let mut buf = vec![0u8; 4096 * 64];
    let us = |t: Instant, n: usize| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // 1. read_page, fresh reader
    let r = store.open_image_ref(name)?;
    let t = Instant::now();
    for &(i, _) in &nz {
        r.read_page(i, &mut buf[..4096])?;
    }
    println!("read_page fresh reader: {:.1} us/page", us(t, nz.len()));
    // again, warm locations
    let t = Instant::now();
    for &(i, _) in &nz {
        r.read_page(i, &mut buf[..4096])?;
    }
    println!("read_page warm locations: {:.1} us/page", us(t, nz.len()));
    // 2. read_pages runs, fresh
    let r = store.open_image_ref(name)?;
    let t = Instant::now();
    for &(a, n) in &runs {
        r.read_pages(a, &mut buf[..n as usize * 4096])?;
    }
    println!("read_pages runs fresh: {:.1} us/page", us(t, ws.len()));
    let t = Instant::now();
    for &(a, n) in &runs {
        r.read_pages(a, &mut buf[..n as usize * 4096])?;
    }
    println!("read_pages runs warm: {:.1} us/page", us(t, ws.len()));
    {
        use snapfork_lazy_restore::PageSource;
        let src = snapfork_lazy_restore::StoreSource::open(&store, name)?;
        let t = Instant::now();
        for &(a, n) in &runs {
            src.read_pages(a, &mut buf[..n as usize * 4096])?;
        }
        println!("StoreSource read_pages runs fresh: {:.1} us/page", us(t, ws.len()));
        let src = snapfork_lazy_restore::StoreSource::open(&store, name)?;
        let t = Instant::now();
        let mut p = 0;
        while p < src.page_count() {
            let n = 64.min(src.page_count() - p);
            src.read_pages(p, &mut buf[..n as usize * 4096])?;
            p += n;
        }
        println!("StoreSource all x64 fresh: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    // 3. read_chunk_into (single lookups)
    let t = Instant::now();
    for (_, id) in &nz {
        store.read_chunk_into(id, &mut buf[..4096], &|| String::new())?;
    }
    println!("read_chunk_into: {:.1} us/page", us(t, nz.len()));
    // 4. location only
    let t = Instant::now();
    for (_, id) in &nz {
        store.location(id)?;
    }
    println!("location only: {:.1} us/page", us(t, nz.len()));
    // 5. all pages sequential read_pages 64, fresh reader (every group's locations loaded with
    // one multi_get) then warm: the difference is what the group loads cost.
    let r = store.open_image_ref(name)?;
    let read_all = |buf: &mut [u8]| -> Result<std::time::Duration, Box<dyn std::error::Error>> {
        let t = Instant::now();
        let mut p = 0;
        while p < r.page_count() {
            let n = 64.min(r.page_count() - p);
            r.read_pages(p, &mut buf[..n as usize * 4096])?;
            p += n;
        }
        Ok(t.elapsed())
    };
    let (fresh, warm) = (read_all(&mut buf)?, read_all(&mut buf)?);
    let all_ids: Vec<_> = (0..r.page_count()).map(|i| r.page_id(i)).collect::<Result<_, _>>()?;
    let nzall = all_ids.iter().filter(|h: &&snapfork_store::Hash| !h.is_zero()).count();
    for (what, d) in [("fresh", fresh), ("warm", warm)] {
        println!(
            "all read_pages x64 {what}: {:.1} us/page ({:.0} ms)",
            d.as_secs_f64() * 1e6 / r.page_count() as f64,
            d.as_secs_f64() * 1e3
        );
    }
    println!(
        "group loads (fresh - warm): {:.1} us per non-zero key",
        (fresh - warm).as_secs_f64() * 1e6 / nzall as f64
    );
    let t = Instant::now();
    for id in all_ids.iter().filter(|h| !h.is_zero()) {
        store.location(id)?;
    }
    println!("single location for all non-zero: {:.1} ms, {:.1} us/key", t.elapsed().as_secs_f64() * 1e3, us(t, nzall));
    Ok(())
}
