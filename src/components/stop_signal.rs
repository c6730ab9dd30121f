//! Ctrl+C and SIGTERM (what cluster schedulers send before preempting a job) ask the
//! training loop to finish its step, save a checkpoint and exit; a second signal exits at
//! once, which is safe because a checkpoint is renamed into place only when complete.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Route SIGINT and SIGTERM here (the `metamix` binary does; a library user keeps its own).
pub fn install() {
    INSTALL.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond signal: exiting now; the last checkpoint is intact");
                std::process::exit(130);
            }
            eprintln!(
                "\nstop requested: finishing this step and saving a checkpoint \
                 (signal again to exit at once)"
            );
        });
        if let Err(e) = installed {
            eprintln!("warning: cannot handle Ctrl+C / SIGTERM ({e}); a signal stops at once");
        }
    });
}

/// Whether a signal asked the run to stop.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Ask the run to stop, as a signal does.
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}
