//! The `diffii` command line: parses arguments and dispatches to one module per subcommand.
use clap::Parser;

mod cli;

// Training and sampling allocate and free many large temporaries per step; with the system
// allocator each one is a fresh mmap whose pages fault in again (measured: about half of a
// textual-inversion step's time on the CPU). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    ignore_file_size_signal();
    fix_thread_count();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
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

/// candle's matrix product asks for the thread count on every call, and while
/// `RAYON_NUM_THREADS` is unset it counts the physical cores by reading and parsing
/// `/proc/cpuinfo` each time (`num_cpus::get_physical`): measured, 30-50 % of a demo
/// concept-learning step on a 2-core machine, and more where `/proc/cpuinfo` lists many cores.
/// Set once here, to the count rayon's pool uses by default (what `available_parallelism`
/// allows: affinity masks and cgroup quotas included), the lookup is a string parse. Results do
/// not depend on the thread count, so no output changes. A value the user set is kept.
fn fix_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok());
    if set.is_some_and(|n| n > 0) {
        return;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Before any thread exists, so no other thread can be reading the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
