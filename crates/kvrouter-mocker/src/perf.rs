//! The engine's timing model: how long a forward pass takes.
//!
//! The reference's polynomial fits (milliseconds): a pass that prefills `T` new
//! tokens costs `4.209989e-7·T² + 1.518344e-2·T + 16.50142` (0 when `T` = 0);
//! decoding costs `−25.74·u² + 54.01·u + 5.74`, at least 1 ms, where `u` is the
//! fraction of the KV cache in use. A mixed pass costs both. Every duration is
//! divided by the speed-up ratio.

/// Milliseconds to prefill `tokens` new tokens in one pass.
pub fn prefill_ms(tokens: usize) -> f64 {
    if tokens == 0 {
        return 0.0;
    }
    let t = tokens as f64;
    4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142
}

/// Milliseconds of one decode pass at KV-cache utilisation `u` (0..=1).
pub fn decode_ms(u: f64) -> f64 {
    let u = u.clamp(0.0, 1.0);
    (-25.74 * u * u + 54.01 * u + 5.74).max(1.0)
}

/// Milliseconds of a pass with `prefill_tokens` new prompt tokens and
/// `decoding` sequences, divided by `speedup`.
pub fn step_ms(prefill_tokens: usize, decoding: usize, kv_usage: f64, speedup: f64) -> f64 {
    let mut ms = prefill_ms(prefill_tokens);
    if decoding > 0 {
        ms += decode_ms(kv_usage);
    }
    ms / speedup
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_polynomials() {
        assert_eq!(prefill_ms(0), 0.0);
        assert!((prefill_ms(1000) - (0.4209989 + 15.18344 + 16.50142)).abs() < 1e-9);
        assert!((decode_ms(0.0) - 5.74).abs() < 1e-12);
        assert!((decode_ms(1.0) - (54.01 - 25.74 + 5.74)).abs() < 1e-9);
        assert_eq!(step_ms(0, 0, 0.0, 2.0), 0.0);
        assert!((step_ms(1000, 3, 0.0, 2.0) - (prefill_ms(1000) + 5.74) / 2.0).abs() < 1e-9);
    }
}
