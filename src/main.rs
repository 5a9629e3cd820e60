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
