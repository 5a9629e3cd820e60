//! The `diffii` command line: parses arguments and dispatches to one module per subcommand.
use clap::Parser;

mod cli;

// Training and sampling allocate and free many large temporaries per step; with the system
// allocator each one is a fresh mmap whose pages fault in again (measured: about half of a
// textual-inversion step's time on the CPU). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
