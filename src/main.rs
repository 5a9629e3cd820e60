//! The `diffii` command line: parses arguments and dispatches to one module per subcommand.
use clap::Parser;

mod cli;

// Training and sampling allocate and free many large temporaries per step; with the system
// allocator each one is a fresh mmap whose pages fault in again (measured: about half of a
// textual-inversion step's time on the CPU). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    keep_freed_memory();
    ignore_file_size_signal();
    fix_thread_count();
    single_compute_pool();
    let args = cli::Cli::parse();
    // The command runs on one of the compute pool's threads rather than on this one. Every
    // kernel splits its work over the pool; called from outside it, each call hands its tasks to
    // the pool's threads and sleeps until they are done, two thread wake-ups per call, and a
    // demo UNet training step makes hundreds of calls. Inside the pool the caller takes a share
    // of the tasks itself and nobody sleeps in between (measured on 2 cores: the scheduler's
    // share of a `pretrain` UNet step's samples went from about 10 % to 5 %, a concept-learning
    // step from 0.077-0.081 to 0.058-0.062 s). Which thread computes what never changes a result.
    if let Err(e) = rayon::scope(|_| cli::run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// mimalloc returns memory that stays free for 10 ms (its `purge_delay`) to the kernel, which
/// zeroes every page again when the next step touches it: a third of a ResNet-50 training
/// step (batch 8, 224 px) was the kernel's `clear_page`, as each step frees and reallocates the
/// same activation buffers. Kept, they are reused as they are; the process's peak memory is
/// the same, it is just not given back between steps.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3 alike); -1 never purges.
    // The crate names this option in neither of its versions' constants.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one integer option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Under a file-size limit (`ulimit -f`, which some batch schedulers set) a write past it
/// raises SIGXFSZ, whose default action kills the process without a word. Ignored, the write
/// fails with EFBIG instead and the error names the file, as for a full disk.
#[cfg(unix)]
fn ignore_file_size_signal() {
    // SAFETY: installs SIG_IGN for one signal before any thread exists; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn ignore_file_size_signal() {}

/// candle runs its own element-wise ops on a second pool of threads (beside rayon's, which runs
/// our kernels and every matrix product), and after each op those threads spin for about half
/// a millisecond (25 000 pause instructions) before sleeping. Between candle's ops come ours, so
/// the spinning threads held cores that rayon's workers were waiting for: in a `pretrain` VAE
/// step on a 2-core machine they were 17 % of all samples, busy with nothing. Unless the user set
/// `CANDLE_NUM_THREADS`, candle's ops run on the calling thread instead (one pool in all, as in
/// PyTorch); measured, the VAE step went from 0.39-0.49 s to 0.33-0.40 s and nothing else moved
/// beyond noise. Results do not depend on thread counts.
fn single_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread exists, so no other thread can be reading the environment.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Stack of each compute thread. The whole command runs on one of them (see `main`), so it gets
/// what the main thread has on Linux by default (8 MiB) and more: candle's backward pass walks the
/// graph recursively. Reserved, not committed: untouched pages cost nothing.
const WORKER_STACK: usize = 64 << 20;

/// candle's matrix product asks for its thread count on every call, and while
/// `RAYON_NUM_THREADS` is unset it counts the physical cores by reading and parsing
/// `/proc/cpuinfo` each time (`num_cpus::get_physical`): measured, 30-50 % of a demo
/// concept-learning step on a 2-core machine, and more where `/proc/cpuinfo` lists many cores.
/// Unless the user set the variable, it is set here once, before any thread exists, to that same
/// physical-core count, and rayon's pool, which would otherwise read it too, is built with the
/// count it uses by default (`available_parallelism`: logical CPUs, affinity masks and cgroup
/// quotas included). Both thread counts stay what they were; results do not depend on them.
/// The pool is built here in any case, for its threads' stack size.
fn fix_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok());
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK);
    if set.is_none_or(|n| n == 0) {
        // Before any thread exists, so no other thread can be reading the environment.
        std::env::set_var("RAYON_NUM_THREADS", num_cpus::get_physical().max(1).to_string());
        pool = pool.num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    // Fails only if the pool already exists, which it cannot at this point.
    let _ = pool.build_global();
}
