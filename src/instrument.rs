//! Measuring what the code does, for `diffii bench` and run summaries: wall time per op class
//! ([`profile`]), the floating-point operation count of the products actually run ([`flops`]),
//! and the process's peak memory ([`peak_rss_mib`]). Everything is off by default and costs one
//! relaxed atomic load per call site when off.

/// Wall time per op class, exclusive (a nested scope pauses its parent), for `diffii bench
/// --profile`.
pub mod profile {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Class {
        Conv,
        Linear,
        Attention,
        GroupNorm,
        LayerNorm,
        Elementwise,
        Layout,
    }

    pub const CLASSES: [Class; 7] =
        [Class::Conv, Class::Linear, Class::Attention, Class::GroupNorm, Class::LayerNorm, Class::Elementwise, Class::Layout];

    impl Class {
        pub fn name(self) -> &'static str {
            match self {
                Class::Conv => "conv",
                Class::Linear => "matmul/linear",
                Class::Attention => "attention",
                Class::GroupNorm => "group norm",
                Class::LayerNorm => "layer norm",
                Class::Elementwise => "elementwise",
                Class::Layout => "copies/layout",
            }
        }
    }

    static ENABLED: AtomicBool = AtomicBool::new(false);
    /// The GPU whose queue each scope drains at its start and end while recording (see
    /// [`start`]); `None` on the CPU, whose ops finish before they return.
    static SYNC: std::sync::Mutex<Option<candle_core::Device>> = std::sync::Mutex::new(None);
    static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
    static CALLS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

    thread_local! {
        // (class, start of its current uninterrupted stretch) for each open scope.
        static STACK: RefCell<Vec<(Class, Instant)>> = const { RefCell::new(Vec::new()) };
    }

    /// Resets the counters and starts recording the ops that run on `device`. A GPU runs ops
    /// after they return, so there every scope waits for the GPU's queue at its start and end
    /// (which slows the whole call, but charges each class its own GPU time).
    pub fn start(device: &candle_core::Device) {
        for i in 0..7 {
            NANOS[i].store(0, Ordering::Relaxed);
            CALLS[i].store(0, Ordering::Relaxed);
        }
        *SYNC.lock().unwrap_or_else(|e| e.into_inner()) = (!device.is_cpu()).then(|| device.clone());
        ENABLED.store(true, Ordering::Relaxed);
    }

    /// Waits for the recorded GPU's queued work, if any.
    fn drain() {
        if let Some(d) = SYNC.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // A failed wait surfaces at the op's own next call; the profile only loses accuracy.
            let _ = d.synchronize();
        }
    }

    /// Stops recording; returns (class, seconds, calls) per class.
    pub fn stop() -> Vec<(Class, f64, u64)> {
        ENABLED.store(false, Ordering::Relaxed);
        *SYNC.lock().unwrap_or_else(|e| e.into_inner()) = None;
        CLASSES
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9, CALLS[i].load(Ordering::Relaxed)))
            .collect()
    }

    fn add(c: Class, since: Instant, now: Instant) {
        NANOS[c as usize].fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `f`, charging its time (minus nested scopes) to `class`.
    #[inline]
    pub fn scope<T>(class: Class, f: impl FnOnce() -> T) -> T {
        if !ENABLED.load(Ordering::Relaxed) {
            return f();
        }
        CALLS[class as usize].fetch_add(1, Ordering::Relaxed);
        drain();
        STACK.with(|s| {
            let now = Instant::now();
            let mut s = s.borrow_mut();
            if let Some((parent, since)) = s.last() {
                add(*parent, *since, now);
            }
            s.push((class, Instant::now()));
        });
        let out = f();
        drain();
        STACK.with(|s| {
            let now = Instant::now();
            let mut s = s.borrow_mut();
            let (c, since) = s.pop().expect("balanced profile scopes");
            add(c, since, now);
            if let Some(top) = s.last_mut() {
                top.1 = Instant::now();
            }
        });
        out
    }
}

/// The multiply-accumulate count of matmuls and convolutions, added by every layer while
/// counting is on, so benchmarks report GFLOP/s measured from the graph actually run.
pub mod flops {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    static COUNT_FLOPS: AtomicBool = AtomicBool::new(false);
    static FLOPS: AtomicU64 = AtomicU64::new(0);

    /// Starts counting floating-point operations of matmuls and convolutions (2 per MAC) from zero.
    pub fn start() {
        FLOPS.store(0, Ordering::Relaxed);
        COUNT_FLOPS.store(true, Ordering::Relaxed);
    }

    /// Stops counting and returns the count since [`start`].
    pub fn stop() -> u64 {
        COUNT_FLOPS.store(false, Ordering::Relaxed);
        FLOPS.load(Ordering::Relaxed)
    }

    /// Adds `macs` multiply-accumulates (when counting).
    pub fn add(macs: usize) {
        if COUNT_FLOPS.load(Ordering::Relaxed) {
            FLOPS.fetch_add(2 * macs as u64, Ordering::Relaxed);
        }
    }
}

/// Peak resident set size of this process, from /proc (0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resets the process's peak-RSS mark (Linux `/proc/self/clear_refs`), so that the next
/// measurement's peak is its own rather than the largest so far.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
