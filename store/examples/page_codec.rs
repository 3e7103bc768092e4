//! What compressing every 4 KiB page as its own zstd frame costs, on a real image: compression
//! speed and size, and the time to decompress one frame, for the store's choice (level 1) and
//! the alternatives that would be faster (literals left raw, frames of 2, 4 or 8 pages,
//! literals left raw except in frames that stay large). Single thread, best of 5, data pages
//! only (all-zero pages are never compressed).
//!
//! `cargo run --release -p snapfork-store --example page_codec -- IMAGE`

use std::time::Instant;

use zstd::zstd_safe::{CCtx, CParameter, DCtx, ParamSwitch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: page_codec IMAGE")?;
    let data = std::fs::read(&path)?;
    let pages: Vec<u8> = data.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).flatten().copied().collect();
    println!("{path}: {} data pages ({:.1} MB)", pages.len() / 4096, pages.len() as f64 / 1e6);
    println!("{:<34} {:>9} {:>10} {:>16}", "frames", "MB/s", "MB stored", "us to decompress");
    for (name, frame, literals) in [
        ("1 page, level 1 (the store's)", 4096, ParamSwitch::Auto),
        ("1 page, literals left raw", 4096, ParamSwitch::Disable),
        ("2 pages, level 1", 8192, ParamSwitch::Auto),
        ("4 pages, level 1", 16384, ParamSwitch::Auto),
        ("8 pages, level 1", 32768, ParamSwitch::Auto),
    ] {
        let mut c = CCtx::create();
        c.set_parameter(CParameter::CompressionLevel(1)).map_err(|e| format!("zstd: {e}"))?;
        c.set_parameter(CParameter::LiteralCompressionMode(literals)).map_err(|e| format!("zstd: {e}"))?;
        let mut out = vec![0u8; 2 * frame];
        let (mut best, mut frames, mut stored) = (f64::MAX, Vec::new(), 0);
        for _ in 0..5 {
            frames.clear();
            stored = 0;
            let t = Instant::now();
            for f in pages.chunks(frame) {
                let n = c.compress2(&mut out[..], f).map_err(|e| format!("zstd: {e}"))?;
                // As the store does: a frame that saves less than 1/16 is kept raw.
                if n + f.len() / 16 < f.len() {
                    frames.push(out[..n].to_vec());
                    stored += n;
                } else {
                    stored += f.len();
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let best_d = decompress_seconds(&frames, frame)?;
        println!(
            "{name:<34} {:>9.0} {:>10.2} {:>16.1}",
            pages.len() as f64 / best / 1e6,
            stored as f64 / 1e6,
            best_d * 1e6
        );
    }
    // Literals left raw, and compressed again with Huffman literals where the raw-literal frame
    // is still large (many literals: where Huffman saves most).
    for threshold in [512usize, 1024, 1536, 2048, 2560] {
        let mut fast = CCtx::create();
        fast.set_parameter(CParameter::CompressionLevel(1)).map_err(|e| format!("zstd: {e}"))?;
        fast.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Disable))
            .map_err(|e| format!("zstd: {e}"))?;
        let mut huf = CCtx::create();
        huf.set_parameter(CParameter::CompressionLevel(1)).map_err(|e| format!("zstd: {e}"))?;
        let mut out = vec![0u8; 8192];
        let mut out2 = vec![0u8; 8192];
        let (mut best, mut frames, mut stored, mut retried) = (f64::MAX, Vec::new(), 0, 0);
        for _ in 0..5 {
            frames.clear();
            (stored, retried) = (0, 0);
            let t = Instant::now();
            for f in pages.chunks(4096) {
                let mut n = fast.compress2(&mut out[..], f).map_err(|e| format!("zstd: {e}"))?;
                let mut frame = &out[..n];
                if n > threshold {
                    retried += 1;
                    let m = huf.compress2(&mut out2[..], f).map_err(|e| format!("zstd: {e}"))?;
                    if m < n {
                        n = m;
                        frame = &out2[..m];
                    }
                }
                if n + f.len() / 16 < f.len() {
                    frames.push(frame.to_vec());
                    stored += n;
                } else {
                    stored += f.len();
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let best_d = decompress_seconds(&frames, 4096)?;
        println!(
            "{:<34} {:>9.0} {:>10.2} {:>16.1}  ({} retried)",
            format!("raw literals, Huffman above {threshold}"),
            pages.len() as f64 / best / 1e6,
            stored as f64 / 1e6,
            best_d * 1e6,
            retried
        );
    }
    Ok(())
}

/// Seconds to decompress one of `frames` (each of at most `frame` bytes), best of 5.
fn decompress_seconds(frames: &[Vec<u8>], frame: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let mut d = DCtx::create();
    let mut back = vec![0u8; frame];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for f in frames {
            d.decompress(&mut back[..], f).map_err(|e| format!("zstd: {e}"))?;
        }
        best = best.min(t.elapsed().as_secs_f64() / frames.len().max(1) as f64);
    }
    Ok(best)
}
